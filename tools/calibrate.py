"""`segfocal calibrate` from a checkout, without installing: `python tools/calibrate.py --help`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segfocal.cli.calibrate import main  # noqa: E402

if __name__ == "__main__":
    main()
