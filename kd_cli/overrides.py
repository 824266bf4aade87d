"""Hydra overrides and config values as plain data: parse `key=value`, compare values, flatten configs.

Shared by the code that compares a run's settings with another's (resume, report, reproduce), so a
value typed `4` and a saved `4.0` are one setting everywhere.
"""

from __future__ import annotations

import json
import math
from typing import Any


def split_override(override: str) -> tuple[str, str]:
    """`++student.kwargs.width=8` -> ("student.kwargs.width", "8"); `~key` -> ("key", "~deleted")."""
    text = str(override)
    key, sep, value = text.lstrip("+~").partition("=")
    return key, value if sep else "~deleted"


def override_map(overrides: list[str], ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """key -> value of a list of overrides (the last one of a key wins), leaving out `ignore`d keys."""
    pairs = (split_override(o) for o in overrides)
    return {key: value for key, value in pairs if key not in ignore}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay whole (a list is one value of one option)."""
    if not isinstance(node, dict):
        return {prefix: node} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def canonical(value: Any) -> str:
    """One spelling per value, so `4` (override) and `4.0` (saved config) are the same setting."""
    if isinstance(value, str):
        value = _parse_scalar(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        number = float(value)
        if math.isfinite(number) and number.is_integer() and abs(number) < 1e15:
            return str(int(number))
        return repr(number)
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _parse_scalar(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("null", "~"):  # Hydra's and YAML's null; `none` is a real value in kd (method=none)
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return float(text)
    except ValueError:
        pass
    if text.strip().startswith("["):  # a list typed on the command line: [1,2] and the saved [1, 2]
        try:
            import yaml

            return yaml.safe_load(text)
        except Exception:  # noqa: BLE001 - not a list after all: compare the text
            return text
    return text


# ---------------------------------------------------------------------- the command line, made Hydra's


def prepare_overrides(overrides: list[str]) -> list[str]:
    """The overrides a user typed, as Hydra must be given them (see each step)."""
    return quote_plain_values(open_swept_method_options(open_model_options(overrides)))


def open_model_options(overrides: list[str]) -> list[str]:
    """`student.kwargs.width=8` -> `++student.kwargs.width=8`: model options are open-ended (checked
    against the model's own signature), so setting one must work whether or not the YAML lists it."""
    prefixes = ("teacher.kwargs.", "student.kwargs.", "model.kwargs.")
    return [f"++{o}" if o.startswith(prefixes) else o for o in overrides]


def open_swept_method_options(overrides: list[str]) -> list[str]:
    """In a sweep over methods (`-m method=at,nst method.tuned_input_size=32`) Hydra first composes the
    default method, which may not have the option: `method.X=` becomes `++method.X=` there. Each job's
    options are still checked against its own method's signature before any job runs."""
    if not any(o.startswith("method=") and "," in o for o in overrides):
        return overrides
    return [f"++{o}" if o.startswith("method.") else o for o in overrides]


# Keys whose value is a path: a plain string whatever characters it holds (never a sweep, a list or a
# function call), so commas, brackets and braces in a file name are quoted for the user too.
PATH_KEYS = (
    "source",
    "run",
    "hydra.run.dir",
    "hydra.sweep.dir",
    "paths.outputs",
    "paths.data",
    "dataset.root",
    "teacher.checkpoint",
)


def quote_plain_values(overrides: list[str]) -> list[str]:
    """`key=VALUE` whose plain value Hydra's grammar cannot read unquoted (a path with letters outside
    ASCII, `données/modèle.pth`, or other characters it reserves) is passed quoted, as the user would
    have had to type it: `key='VALUE'`. So is a path (PATH_KEYS) with commas, brackets or braces. Other
    values with structure (a sweep's commas, a list, an interpolation, a function call) are left to Hydra,
    whose error then says what it could not read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and value and _needs_quotes(parser, key.lstrip("+~"), value, override):
            quoted = _quoted(value.replace("${", "\\${") if _existing(value) else value)
            if _parses(parser, f"{key}={quoted}"):
                override = f"{key}={quoted}"
        out.append(override)
    return out


def _needs_quotes(parser, key: str, value: str, override: str) -> bool:
    if key in PATH_KEYS and value[0] not in "'\"" and ("${" not in value or _existing(value)):
        # a path is one string, always; a file that exists named `${oc.env:HOME}.pth` is that file, not
        # an interpolation (it imported another file in silence)
        return bool(set(value) & set(",[]{}$")) or not _parses(parser, override)
    return _plain(value) and not _parses(parser, override)


def _existing(path: str) -> bool:
    import os

    return os.path.exists(os.path.expanduser(path))


def _plain(value: str) -> bool:
    import re

    return not (set(value) & set(",[]{}") or "${" in value or re.match(r"^\w+\(", value) or value[0] in "'\"")


def _quoted(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _parses(parser, override: str) -> bool:
    try:
        parser.parse_overrides([override])
    except Exception:  # noqa: BLE001 - Hydra's OverrideParseException (and ANTLR's) mean: not as it stands
        return False
    return True
