"""segfocal: semantic-segmentation training built around a class-balanced dense focal loss.

Sub-packages: ``losses`` (torch only), ``config``, ``data``, ``models``, ``engine``, ``evaluation``.
Nothing heavy is imported here, so ``import segfocal.losses`` pulls in torch alone.
"""
__version__ = "0.1.0"
