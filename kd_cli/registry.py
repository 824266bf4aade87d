"""A tiny name -> callable registry shared by models, data sets and methods.

Each entry is a function (or class) whose keyword parameters are its options. Options coming
from a config are checked against that signature here, so a typo in a YAML key or an override
is a one-line error naming the valid options, for every model, data set and method alike.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Mapping

from kd_cli.errors import KdError, unknown_choice


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable] = {}

    def register(self, name: str | None = None) -> Callable[[Callable], Callable]:
        def add(fn: Callable) -> Callable:
            key = name or fn.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._entries[key] = fn
            return fn

        return add

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise unknown_choice(self.kind, name, self._entries)
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def build(self, name: str, fixed: Mapping[str, Any], options: Mapping[str, Any]) -> Any:
        """Call entry `name` with `fixed` arguments (from code) and `options` (from the config)."""
        fn = self.get(name)
        check_options(f"{self.kind} '{name}'", fn, options, exclude=fixed.keys())
        return fn(**fixed, **options)


def check_options(what: str, fn: Callable, options: Mapping[str, Any], exclude: Iterable[str] = ()) -> None:
    """Raise a KdError when `options` has a key `fn` does not take, or lacks one it needs."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if n not in exclude and p.kind is not p.VAR_POSITIONAL]
    for key in options:
        if key not in accepted:
            raise unknown_choice(f"option of {what}", key, accepted)
    missing = [
        n for n in accepted if params[n].default is inspect.Parameter.empty and n not in options
    ]
    if missing:
        raise KdError(f"{what} needs option(s) {', '.join(missing)}; set them in its YAML or as overrides")
