"""Training and evaluation machinery: the loop, checkpoints, precision, logging, distribution."""
