"""``python -m segfocal``: the ``segfocal`` command."""
from .cli import main

main()
