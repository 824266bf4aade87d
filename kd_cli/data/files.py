"""Turning "files absent", "download failed" and "files corrupt" into one-line, fixable errors."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

from kd_cli.errors import KdError

T = TypeVar("T")


def open_or_explain(
    title: str, folder: str, expected: str, files: Sequence[str], download: bool, open_: Callable[[], T]
) -> T:
    """Run `open_()` (torchvision's own loading and download code), explaining any failure in one line.

    `folder` is the absolute folder the files belong in, `expected` how the user should recognise them
    (e.g. "cifar-100-python/"), `files` their absolute paths.
    """
    missing = [path for path in files if not os.path.isfile(path)]
    if missing and not download:
        raise KdError(
            f"{title} not found under {folder} (expected {expected}); put the files there "
            f"or run with dataset.download=true (needs internet)"
        )
    try:
        return open_()
    except KdError:
        raise
    except Exception as error:  # torchvision raises RuntimeError, URLError, OSError, pickle/parse errors...
        if missing:
            raise KdError(
                f"{title}: downloading into {folder} failed ({brief(error)}); check the internet connection, "
                f"or put the files there by hand (expected {expected})"
            ) from error
        raise KdError(
            f"{title} files under {folder} look corrupt ({brief(error)}); delete them and download again "
            f"(dataset.download=true) or replace them (expected {expected})"
        ) from error


def brief(error: BaseException, limit: int = 160) -> str:
    """An exception on one short line: enough to tell "no network" from "checksum wrong"."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # torchvision's multi-mirror errors put the cause on the last line, the context on the first.
    text = " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
