"""The Hugging Face hub, where timm and smp keep pretrained weights: read from the local cache only, quietly,
and a cheap check whether the hub can be reached at all (so an offline machine gets one line, not retries)."""

from __future__ import annotations

import contextlib
import logging

HUB_HOST = "huggingface.co"


@contextlib.contextmanager
def hub_offline():
    """huggingface_hub reads only its cache inside (it checks this flag on every call)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        with hub_quiet():
            yield
    finally:
        constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def hub_quiet():
    """The hub logs each retry as a warning: kd says what went wrong in one line instead."""
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "timm", "segmentation_models_pytorch")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR + 10)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def reachable(host: str, timeout: float = 3.0) -> bool:
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
