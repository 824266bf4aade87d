"""A tiny name -> callable registry shared by models, data sets, methods and compression steps.

Each entry is a function (or class) whose keyword parameters are its options. Options coming
from a config are checked against that signature here, before anything is built: an unknown key,
a wrong type or a value out of range is a one-line error naming the key, for every model, data
set, method and step alike. The signature is the schema:

    def __init__(self, student, teacher, *, temperature: Positive, kd_weight: NonNegative, ...)

`Positive`, `NonNegative`, `Probability`, `PositiveInt`, ... are `typing.Annotated` types carrying
a `Range`; plain `float`/`int`/`bool`/`str`, `list[...]`, `X | None` and `Literal[...]` are checked
too. A float is never NaN or infinite. Checks that tie several options together live in an optional
`validate_options(**options)` of the entry (a static or class method), called with every option.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import pkgutil
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from kd_cli.errors import KdError, unknown_choice


@dataclass(frozen=True)
class Range:
    """`low <= value <= high` (either end open with `low_open`/`high_open`, or absent with None)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self, value: float | None = None) -> str:
        """The range; where its upper end is only the generic bound of counts (MAX_COUNT), the side the
        value crossed (`>= 1`, or `<= 2147483647`): that bound is not what a user means to set."""
        if value is not None and self.low is not None and self.high is not None and self.high == MAX_COUNT:
            if value <= self.low if self.low_open else value < self.low:
                return Range(self.low, None, self.low_open).describe()
            return Range(None, self.high, False, self.high_open).describe()
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return (
            f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
            f"{')' if self.high_open else ']'}"
        )


Positive = Annotated[float, Range(0, low_open=True)]
NonNegative = Annotated[float, Range(0)]
Probability = Annotated[float, Range(0, 1)]
OpenFraction = Annotated[float, Range(0, 1, low_open=True, high_open=True)]  # strictly between 0 and 1
# A softmax temperature: above 1000 every distribution is uniform to float precision, and T^2 overflows
# long before a float does (1e308 was answered by Python's "Numerical result out of range").
Temperature = Annotated[float, Range(0, 1000, low_open=True)]
# Counts are bounded too: a number typed with a few digits too many is refused at once, not run out of
# memory or time (and stays within what torch's int32 sizes take).
MAX_COUNT = 2**31 - 1
PositiveInt = Annotated[int, Range(1, MAX_COUNT)]
NonNegativeInt = Annotated[int, Range(0, MAX_COUNT)]


class Registry:
    """Names -> callables: the one way kd is extended (methods, models, data sets, compression steps,
    optimisers). `register(name)` is the decorator; the entry's keyword arguments are its options, their
    annotations the types and ranges `check` enforces. `name_attribute` stores the registered name on a
    class (for its messages); `on_register(name, entry)` lets the registry's owner do more (compress
    records how its steps' saved structure is rebuilt). A `family` serves every name under a prefix
    (`timm/...`) from one resolver, for libraries whose names are too many to register one by one."""

    def __init__(
        self, kind: str, name_attribute: str | None = None, on_register: Callable[[str, Callable], None] | None = None
    ):
        self.kind = kind
        self.name_attribute = name_attribute
        self.on_register = on_register
        self._entries: dict[str, Callable] = {}
        self._families: dict[str, Callable[[str], Callable]] = {}

    def family(self, prefix: str, resolve: Callable[[str], Callable]) -> None:
        """Serve `PREFIX<name>` by `resolve(name)`, which returns the entry or raises a KdError."""
        self._families[prefix] = resolve

    def register(self, name: str | None = None) -> Callable[[Callable], Callable]:
        """Decorator: `@METHODS.register("kd")` (exported as `register_method`, `register_model`,
        `register_dataset`, `register_step`, `register_optimizer`) adds a class or function under `name`
        (its `__name__` when None); registering a name twice is a bug, raised at import."""

        def add(fn: Callable) -> Callable:
            key = name or fn.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            if self.name_attribute:
                setattr(fn, self.name_attribute, key)
            if self.on_register:
                self.on_register(key, fn)
            self._entries[key] = fn
            return fn

        return add

    def get(self, name: str) -> Callable:
        if name in self._entries:
            return self._entries[name]
        prefix = next((p for p in self._families if name.startswith(p)), None)
        if prefix is not None:
            return self._families[prefix](name[len(prefix) :])
        raise unknown_choice(self.kind, name, [*self._entries, *(f"{p}NAME" for p in self._families)])

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries or any(name.startswith(p) for p in self._families)

    def check(self, name: str, options: Mapping[str, Any], fixed: Iterable[str] = (), path: str = "") -> None:
        """Names, types and ranges of `options` for entry `name`, without building anything."""
        check_options(f"{self.kind} '{name}'", self.get(name), options, exclude=fixed, path=path)

    def build(self, name: str, fixed: Mapping[str, Any], options: Mapping[str, Any], path: str = "") -> Any:
        """Call entry `name` with `fixed` arguments (from code) and `options` (from the config)."""
        self.check(name, options, fixed.keys(), path)
        return self.get(name)(**fixed, **options)


def check_options(
    what: str, fn: Callable, options: Mapping[str, Any], exclude: Iterable[str] = (), path: str = ""
) -> None:
    """Raise a KdError when `options` has a key `fn` does not take, lacks one it needs, or holds a
    value of the wrong type or out of range. `path` is where the options sit in the config
    (`method`, `student.kwargs`), for messages that name the key as the user would type it."""
    exclude = set(exclude)
    params, open_ended = entry_parameters(fn)
    accepted = [n for n in params if n not in exclude]
    prefix = f"{path}." if path else ""
    if not open_ended:
        for key in options:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise KdError(
                    f"unknown option {prefix}{key} of {what}{hint} (choose from: {', '.join(sorted(accepted))})"
                )
        missing = [n for n in accepted if params[n].default is inspect.Parameter.empty and n not in options]
        if missing:
            raise KdError(f"{what} needs option(s) {', '.join(missing)}; set them in its YAML or as overrides")
    hints = option_hints(fn)
    for key, value in options.items():
        if key in hints:
            problem = value_problem(value, hints[key])
            if problem:
                raise KdError(f"{prefix}{key}={_show(value)} must be {problem} ({what})")
    validate = getattr(fn, "validate_options", None)
    if callable(validate):
        defaults = {n: params[n].default for n in accepted if params[n].default is not inspect.Parameter.empty}
        validate(**{**defaults, **options})  # an option given replaces its default


def value_problem(value: Any, hint: Any) -> str | None:
    """None when `value` fits the annotation `hint`, else what it must be ("a number > 0")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        problem = value_problem(value, args[0])
        if problem:
            return problem
        for limit in (a for a in args[1:] if isinstance(a, Range)):
            if isinstance(value, (list, tuple)):
                outside = [v for v in value if isinstance(v, (int, float)) and v not in limit]
                if outside:
                    return f"a list of values {limit.describe(outside[0])}"
            elif isinstance(value, (int, float)) and value not in limit:
                return f"{_kind(args[0])} {limit.describe(value)}"
        return None
    if origin in (typing.Union, types.UnionType):
        problems = [value_problem(value, member) for member in args]
        if any(p is None for p in problems):
            return None
        members = [m for m in args if m is not type(None)]
        if len(members) == 1:  # `X | None`: say what X must be (with its range), or null
            return f"{value_problem(value, members[0])} or null"
        return " or ".join(_kind(member) for member in args)
    if origin is Literal:
        same_kind = [a for a in args if a == value and isinstance(value, bool) == isinstance(a, bool)]
        return None if same_kind else "one of " + ", ".join(map(str, args))
    if hint is type(None):
        return None if value is None else "null"
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return "a number"
        return None if math.isfinite(value) else "a finite number"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
    if hint in (bool, str):
        return None if isinstance(value, hint) else _kind(hint)
    if origin in (list, tuple, typing.get_origin(typing.Sequence[int])):
        if not isinstance(value, (list, tuple)):
            return _kind(hint)
        element = args[0] if args else Any
        problems = [value_problem(v, element) for v in value] if element is not Any else []
        bad = next((p for p in problems if p), None)
        return f"a list whose items are each {bad}" if bad else None
    if origin is dict or hint is dict:
        return None if isinstance(value, dict) else "a mapping"
    return None  # Any, modules and other types: the entry checks them itself


def _kind(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _kind(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_kind(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    names = {float: "a number", int: "a whole number", bool: "true or false", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    if origin in (list, tuple) or (origin is not None and issubclass(origin, typing.Sequence)):
        return "a list"
    return getattr(hint, "__name__", str(hint))


def entry_parameters(fn: Callable) -> tuple[dict[str, inspect.Parameter], bool]:
    """(an entry's options by name, whether it takes any other keyword too). A class whose `__init__`
    passes `**options` on to its base has the base's options as well, declared once there: a feature
    method declares only its own, FeatureDistiller the layers, CE and KD options they all share."""
    if not inspect.isclass(fn):
        return _keyword_options(inspect.signature(fn))
    params: dict[str, inspect.Parameter] = {}
    for cls in fn.__mro__:
        if "__init__" not in vars(cls) or cls is object:
            continue
        own, passes_on = _keyword_options(inspect.signature(vars(cls)["__init__"]))
        params.update({name: p for name, p in own.items() if name != "self" and name not in params})
        if not passes_on:
            return params, False
    return params, True


def _keyword_options(signature: inspect.Signature) -> tuple[dict[str, inspect.Parameter], bool]:
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    named = {name: p for name, p in signature.parameters.items() if p.kind not in kinds}
    return named, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())


def option_hints(fn: Callable) -> dict[str, Any]:
    """The annotations of an entry's options, inherited ones too (see entry_parameters)."""
    targets = (
        [vars(c)["__init__"] for c in reversed(fn.__mro__) if "__init__" in vars(c) and c is not object]
        if inspect.isclass(fn)
        else [fn]
    )
    hints: dict[str, Any] = {}
    for target in targets:  # base first: a subclass's own annotation of an option wins
        try:
            hints.update(typing.get_type_hints(target, include_extras=True))
        except Exception:  # noqa: BLE001 - an annotation that cannot be evaluated is simply not checked
            continue
    return hints


def _number(value: float | None) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check_number(key: str, value: Any, limit: Range | None = None, hint: str = "") -> None:
    """`key=value` must be a finite number (within `limit`): one line naming the key otherwise."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value):
        raise KdError(f"{key}={_show(value)} must be a finite number{f' ({hint})' if hint else ''}")
    if limit is not None and value not in limit:
        raise KdError(f"{key}={_show(value)} must be {limit.describe(value)}{f' ({hint})' if hint else ''}")


def import_submodules(package: str, path: Iterable[str]) -> None:
    """Import every module of a package (`__name__`, `__path__`), so each registers what it defines:
    adding a method, model family, data set or compression step is adding one file."""
    for info in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{info.name}")
