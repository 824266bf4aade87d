"""Reading CIFAR's pickled batches without ever running code from them.

A pickle can name any importable callable and have it called (`os.system`, `builtins.eval`, ...);
torchvision reads CIFAR's `data_batch_*`, `test_batch`, `train`, `test` and `meta` files with
`pickle.load`, so a crafted file runs code as soon as it is read. The md5 check stands in the way only
for the official files and only while `dataset.verify_checksums` is true.

`RestrictedUnpickler` resolves only the globals those files contain: numpy's array reconstruction
(`numpy.core.multiarray._reconstruct`, `numpy.ndarray`, `numpy.dtype`, `scalar`; `numpy._core.*` as
numpy 2 writes it; `_frombuffer` for protocol 5) and `_codecs.encode` (how Python 3 writes bytes at
protocol 2). Everything else (dicts, lists, str, bytes, ints) needs no global. Any other global is
refused before it is looked up, so nothing from the file is imported or called.

`module` is a stand-in for the `pickle` module with that unpickler behind `load`/`loads`:
torchvision_sets gives it to copies of torchvision's own reading functions (see `reading_with`), so
torchvision's classes, download and integrity code stay as they are.
"""

from __future__ import annotations

import importlib
import io
import pickle
import types
from collections.abc import Callable
from typing import Any

from kd_cli.errors import KdError

# (module, name) as a pickle names it -> (modules to try, in order, name): numpy 2 moved numpy.core to
# numpy._core (the old path still imports, with a DeprecationWarning), so both spellings are mapped to
# whichever the installed numpy has.
_NUMPY_CORE = {
    "multiarray": ("numpy._core.multiarray", "numpy.core.multiarray"),
    "numeric": ("numpy._core.numeric", "numpy.core.numeric"),
}
ALLOWED: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("numpy", "ndarray"): (("numpy",), "ndarray"),
    ("numpy", "dtype"): (("numpy",), "dtype"),
    ("_codecs", "encode"): (("_codecs",), "encode"),
}
for _core in ("numpy.core", "numpy._core"):
    ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = (_NUMPY_CORE["multiarray"], "_reconstruct")
    ALLOWED[(f"{_core}.multiarray", "scalar")] = (_NUMPY_CORE["multiarray"], "scalar")
    ALLOWED[(f"{_core}.numeric", "_frombuffer")] = (_NUMPY_CORE["numeric"], "_frombuffer")


class ForbiddenGlobal(pickle.UnpicklingError):
    """The file names a global outside `ALLOWED`."""


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        target = ALLOWED.get((module, name))
        if target is None:
            raise ForbiddenGlobal(f"{module}.{name}")
        modules, attribute = target
        for candidate in modules:
            try:
                return getattr(importlib.import_module(candidate), attribute)
            except (ImportError, AttributeError):
                continue
        raise ForbiddenGlobal(f"{module}.{name} (not in this numpy)")


def load(file, *, encoding: str = "ASCII", errors: str = "strict", **_ignored: Any) -> Any:
    """`pickle.load` for data files: refuses, in one line naming the file, any global outside `ALLOWED`."""
    try:
        return RestrictedUnpickler(file, encoding=encoding, errors=errors).load()
    except ForbiddenGlobal as error:
        name = getattr(file, "name", "a data file")
        raise KdError(
            f"{name} asks to run {error} when read, which a data file of this kind never does; kd did not run "
            "it. Delete the file and download the data set again (dataset.download=true), or replace it with "
            "the official one"
        ) from None


def loads(data: bytes, **kwargs: Any) -> Any:
    return load(io.BytesIO(data), **kwargs)


module = types.SimpleNamespace(
    load=load,
    loads=loads,
    Unpickler=RestrictedUnpickler,
    UnpicklingError=pickle.UnpicklingError,
    HIGHEST_PROTOCOL=pickle.HIGHEST_PROTOCOL,
    DEFAULT_PROTOCOL=pickle.DEFAULT_PROTOCOL,
)


def reading_with(fn: Callable, name: str = "pickle") -> Callable:
    """A copy of function `fn` whose global `name` (its module's `import pickle`) is `module`.

    Only the copy sees the stand-in: torchvision's module, and any other code, keep the real pickle.
    Refused (KdError) when `fn` does not read the global `name` at all, i.e. when the installed
    torchvision reads its files some other way that this copy would not cover."""
    code = fn.__code__
    if name not in code.co_names:
        raise KdError(
            f"this torchvision ({fn.__module__}.{fn.__qualname__}) no longer reads its files through "
            f"`{name}`, so kd cannot read them safely; install the torchvision version kd pins"
        )
    copy = types.FunctionType(code, {**fn.__globals__, name: module}, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__, copy.__doc__, copy.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    return copy
