"""The one exception the data pipeline raises for problems with the user's files."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


class DataError(ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent; the message names the path.

    ``path`` (when known) is the file at fault, for code that collects problems instead of stopping.
    """

    def __init__(self, message: str, path: Optional[Union[str, Path]] = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
