"""The one exception type that reaches the user as a single line, without a traceback."""

from __future__ import annotations

import difflib
from typing import Iterable


class KdError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it."""


class Refusal(BaseException):
    """A KdError that must get through code that catches every Exception on its way to the CLI
    (Hydra's callback runner turns those into warnings): `raise Refusal(KdError(...))`."""

    def __str__(self) -> str:
        return str(self.args[0])


def unknown_choice(kind: str, name: str, choices: Iterable[str]) -> KdError:
    """`unknown model 'resnt18'; did you mean resnet18? (choose from: ...)`."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return KdError(f"unknown {kind} '{name}'{hint} (choose from: {', '.join(choices)})")


# Warnings of this process, in order; a run directory records them in its summary.json.
WARNINGS: list[str] = []


def warn(message: str) -> None:
    """One line on stderr, `kd: warning: ...`: something the user should know that does not stop the run."""
    import sys

    WARNINGS.append(message)
    print(f"kd: warning: {message}", file=sys.stderr, flush=True)
