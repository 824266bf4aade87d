"""What both export paths share (kd_cli/stages/export.py, export_boxes.py): where model.json goes in the
file, the exporter's output kept quiet, and an exception's first line."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout

METADATA_KEY = "model.json"  # ONNX metadata_props key / TorchScript extra file holding model.json
EXPORTER_LOGGERS = ("torch", "onnxscript", "onnx_ir")


@contextmanager
def exporter_output() -> Iterator[io.StringIO]:
    """While torch.onnx.export runs: its prints (graph dumps when torch.export fails) go to a buffer, and
    its loggers (and onnxscript's, which log every optimiser pass at INFO) say only errors."""
    buffer = io.StringIO()
    loggers = [
        logger
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and name.split(".")[0] in EXPORTER_LOGGERS
    ]
    loggers += [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with redirect_stdout(buffer), redirect_stderr(buffer):
            yield buffer
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
