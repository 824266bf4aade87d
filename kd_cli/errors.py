"""The one exception type that reaches the user as a single line, without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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


def one_line(error: BaseException, where: str = "") -> str:
    """A readable single line from any exception, Hydra's multi-line ones included. `where`: the
    settings that choose where the command writes, for a file error (a stage's hydra.run.dir=)."""
    if isinstance(error, (KdError, Refusal)):
        return str(error)
    if isinstance(error, OSError) and error.filename:  # e.g. Hydra making a run directory where it cannot
        return (
            f"{error.strerror or type(error).__name__}: {error.filename}; check that the path is right and "
            f"that you may write there{f' ({where})' if where else ''}"
        )
    from kd_cli.hydra_errors import describe

    return describe(error)


# Library warnings kd knows, in its own words: (pattern of the library's message, kd's line).
KNOWN_WARNINGS: list[tuple[str, str]] = [
    (
        r"This DataLoader will create (\d+) worker processes in total\. Our suggested max number of worker in "
        r"current system is (\d+)",
        r"trainer.num_workers=\1 is more than the \2 this machine can run at once; lower it "
        r"(trainer.num_workers=\2), or loading may slow training down or freeze",
    ),
]
_SHOWN: set[str] = set()


def library_warnings_as_kd_lines() -> None:
    """Every Python warning a library emits (torch's UserWarnings, Pillow's, ...) becomes one `kd: warning:`
    line, once per message: in kd's words where kd knows it (KNOWN_WARNINGS), else the library's
    first line and where it came from; never the library's multi-line report with its source line."""
    import re
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = (str(message).strip().splitlines() or [category.__name__])[0]
        for pattern, said in KNOWN_WARNINGS:
            if re.search(pattern, text):
                text = re.sub(f".*{pattern}.*", said, text)
                break
        else:
            path = str(filename).replace("\\", "/")  # the library's package, else the file's module
            origin = path.split("site-packages/")[1].split("/")[0] if "site-packages/" in path else path.rsplit("/")[-1]
            text = f"{text} ({category.__name__} from {origin.removesuffix('.py')})"
        if text not in _SHOWN:
            _SHOWN.add(text)
            warn(text)

    warnings.showwarning = show


# The first error of this process's jobs. Hydra prints its own multi-line report for an exception
# escaping a job, so jobs hand errors over here (`hand_over`) and the CLI raises the first one after
# Hydra returns (`take_error`).
_JOB_ERRORS: list[BaseException] = []
# Runs this process recorded as `interrupted` (for the CLI's message).
INTERRUPTED_RUNS: list[str] = []
# What a command says of its own interruption, when it knows better than the runs it records (kd table).
INTERRUPTION_NOTES: list[str] = []


def note_interruption(message: str) -> None:
    INTERRUPTION_NOTES.append(message)


def hand_over(error: BaseException) -> None:
    if not _JOB_ERRORS:
        _JOB_ERRORS.append(error)


def take_error() -> BaseException | None:
    return _JOB_ERRORS.pop(0) if _JOB_ERRORS else None


# Warnings of this process, in order; a run directory records them in its summary.json.
WARNINGS: list[str] = []


def warn(message: str) -> None:
    """One line on stderr, `kd: warning: ...`: something the user should know that does not stop the run."""
    import sys

    WARNINGS.append(message)
    print(f"kd: warning: {single_line(message)}", file=sys.stderr, flush=True)


def single_line(text: str) -> str:
    """`text` on one line whatever it quotes (a checkpoint key or a file name holding a newline): control
    characters shown as escapes."""
    return "".join(character if character.isprintable() else repr(character)[1:-1] for character in text)
