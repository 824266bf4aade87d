"""Fold Hydra's and OmegaConf's multi-line error reports into one line for the user."""

from __future__ import annotations

import difflib
import re

NOISE = (
    "full_key:",
    "object_type",
    "reference_type",
    "See http",
    "Set the environment variable",
    "Config search path",
    "provider=",
)


def describe(error: BaseException) -> str:
    unknown = _unknown_key(error)
    if unknown:
        return unknown
    parts = _messages(error)
    lines = [line.strip() for part in parts for line in part.splitlines()]
    lines = [
        line
        for line in lines
        if line and not line.startswith(NOISE) and "$VALUE" not in line and "$FULL_KEY" not in line
    ]
    text = "; ".join(dict.fromkeys(_without_repeats(_fold_option_lists(lines))))
    text = _grammar_error(text)
    text = _group_of_another_stage(text)
    text = _interpolated_type_error(text)
    text = _list_type_error(text)
    text = _suggest_for_missing_option(text)
    text = _install_hint_for_plugin(text)
    text = _plain_type_error(text)
    missing = re.fullmatch(r"Missing mandatory value: ([\w.]+)", text)
    if missing:
        text += f"; set it on the command line, e.g. {missing.group(1)}=..."
    return text or type(error).__name__


def _unknown_key(error: BaseException | None) -> str | None:
    """A key that a typed config node does not have (`trainer.epochz=3`): Hydra advises `+key=` to append
    it, which that node refuses too; say which options it has instead, the closest first."""
    while error is not None:
        node, key, full_key = (getattr(error, name, None) for name in ("parent_node", "key", "full_key"))
        if type(error).__name__ in ("ConfigAttributeError", "ConfigKeyError") and key and full_key and node is not None:
            try:
                options = [str(k) for k in node.keys()]
            except Exception:  # noqa: BLE001 - a node of another kind: Hydra's own words then
                return None
            parent = str(full_key).rpartition(".")[0]
            if parent and not options:  # a group this stage leaves unset (kd evaluate's dataset)
                return (
                    f"{full_key} cannot be set while {parent} is not chosen: give {parent}=NAME first, then {full_key}="
                )
            close = difflib.get_close_matches(str(key), options, n=3)
            hint = f" (did you mean {', '.join(f'{parent}.{c}' if parent else c for c in close)}?)" if close else ""
            return f"{full_key} is not an option{hint}; {parent or 'the config'} has: {', '.join(options)}"
        error = error.__cause__ or error.__context__
    return None


# Hydra plugins that are optional extras of kd: the option Hydra cannot find -> the extra to install.
PLUGIN_EXTRAS = {
    "hydra/launcher/joblib": "joblib",
    "hydra/launcher/submitit_": "slurm",
    "hydra/launcher/slurm": "slurm",
    "hydra/sweeper/optuna": "optuna",
}


# OmegaConf's name for a schema type -> what the user should give.
TYPE_WORDS = {
    "Float": "a number, e.g. 0.5",
    "Integer": "a whole number, e.g. 3",
    "bool": "true or false",
    "Boolean": "true or false",
}
TYPE_ERROR = re.compile(
    r"Error merging override ([\w.+~]+)=(.*?); Value '.*?' (?:of type '\w+' could not be "
    r"converted to (\w+)|is not a valid (\w+))"
)


def _without_repeats(lines: list[str]) -> list[str]:
    """OmegaConf repeats a cause inside each wrapper's message: keep each line once, and drop one that is
    only another line with a wrapper's prefix in front. (Option lists are folded into one line first, so
    an option's name is never taken for a repeat of a message that quotes it: `method=pkdd` lists `pkd`.)"""
    kept: list[str] = []
    for line in lines:
        core = re.sub(r"^\w+ (?:raised )?while resolving interpolation: ", "", line)
        if not any(core.endswith(other) or other.endswith(core) for other in kept):
            kept.append(core)
    return kept


def _group_of_another_stage(text: str) -> str:
    """`kd train-teacher student=mlp`: Hydra advises `+student=mlp`, which would add a group the stage never
    reads; say the stage has no such setting instead."""
    match = re.match(r"Could not override '([\w/]+)'\. No match in the defaults list", text)
    if not match:
        return text
    return f"{match.group(1)}= is not a setting of this stage (kd STAGE --help lists its groups)"


def _grammar_error(text: str) -> str:
    """ANTLR's lexer and parser words -> what to check in the override."""
    if not re.search(
        r"LexerNoViableAltException|no viable alternative at input|mismatched input|extraneous input", text
    ):
        return text
    detail = re.sub(r"^LexerNoViableAltException: ", "", text.split("; ")[0])
    return (
        f"Hydra cannot read the override ({detail}): check its quotes and brackets, and quote a value that "
        "holds special characters, e.g. key='a value'"
    )


INTERPOLATED_TYPE = re.compile(
    r"While dereferencing interpolation '\$\{([\w.]+)\}': Value '(.*?)' is not a valid (\w+)"
)


def _interpolated_type_error(text: str) -> str:
    """A wrong type given to a key that another key interpolates (augmentation.hflip <- dataset.hflip)."""
    match = INTERPOLATED_TYPE.search(text)
    if not match:
        return text
    key, value, wanted = match.groups()
    return f"{key}={value} is not accepted: {key} takes {TYPE_WORDS.get(wanted, 'a value of type ' + wanted)}"


LIST_TYPE = re.compile(r"Error merging override ([\w.+~]+)=(.*?); Invalid value assigned: \w+ is not a ListConfig")


def _list_type_error(text: str) -> str:
    match = LIST_TYPE.match(text)
    if not match:
        return text
    key, value = match.group(1).lstrip("+~"), match.group(2)
    return f"{key}={value} is not accepted: {key} takes a list, e.g. {key}=[0.9,0.999]"


def _plain_type_error(text: str) -> str:
    """`Error merging override k=v; Value 'v' ... could not be converted to Integer; ...` -> what k takes."""
    match = TYPE_ERROR.match(text)
    if not match:
        return text
    key, value, wanted = match.group(1).lstrip("+~"), match.group(2), match.group(3) or match.group(4)
    return f"{key}={value} is not accepted: {key} takes {TYPE_WORDS.get(wanted, 'a value of type ' + wanted)}"


def _install_hint_for_plugin(text: str) -> str:
    for option, extra in PLUGIN_EXTRAS.items():
        if f"'{option}" in text and "Could not" in text:
            return f"{text}; that Hydra plugin is an optional extra: pip install 'kd-cli[{extra}]'"
    return text


def _messages(error: BaseException | None) -> list[str]:
    """The error's message and those of its causes, without repeats."""
    seen: list[str] = []
    while error is not None and len(seen) < 4:
        message = str(error).strip()
        if message and message not in seen:
            seen.append(message)
        error = error.__cause__ or error.__context__
    return seen


def _fold_option_lists(lines: list[str]) -> list[str]:
    """`Available options in 'x':` followed by one option per line -> one line with a comma list."""
    out: list[str] = []
    options: list[str] | None = None
    for line in lines:
        if line.startswith("Available options in"):
            options = []
            out.append(line.rstrip(":") + ": ")
        elif options is not None and re.fullmatch(r"[\w\-./]+", line):
            options.append(line)
            out[-1] = out[-1].split(": ")[0] + ": " + ", ".join(options)
        else:
            options = None
            out.append(line)
    return out


def _suggest_for_missing_option(text: str) -> str:
    """Add `did you mean` when Hydra could not find a group option that is close to a real one."""
    missing = re.search(r"Could not find '([\w\-]+)/([\w\-.]+)'", text)
    available = re.search(r"Available options in '[\w\-]+': ([\w\-, .]+)", text)
    if not (missing and available):
        return text
    close = difflib.get_close_matches(missing.group(2), available.group(1).split(", "), n=3)
    return text + (f"; did you mean {', '.join(close)}?" if close else "")
