"""The one exception type that reaches the user as a single line, without a traceback."""

from __future__ import annotations

import difflib
from typing import Iterable


class KdError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it."""


def unknown_choice(kind: str, name: str, choices: Iterable[str]) -> KdError:
    """`unknown model 'resnt18'; did you mean resnet18? (choose from: ...)`."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return KdError(f"unknown {kind} '{name}'{hint} (choose from: {', '.join(choices)})")
