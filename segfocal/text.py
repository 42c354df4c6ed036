"""Wording shared by the messages users read: counts with their noun (and verb) in the right number."""
from __future__ import annotations

from typing import Optional


def counted(count: int, noun: str, verbs: Optional[str] = None) -> str:
    """``count`` with ``noun``, plural (an added s) unless the count is 1, then the verb of ``verbs``
    ("singular/plural") that agrees: ``counted(1, "pixel", "has/have")`` is "1 pixel has"."""
    words = f"{count} {noun}{'' if count == 1 else 's'}"
    if verbs is None:
        return words
    singular, plural = verbs.split("/")
    return f"{words} {singular if count == 1 else plural}"
