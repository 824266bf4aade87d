"""A literature table's description (kd_cli/table/NAME.yaml, or a file of the user's): its pairs,
methods, recipes, published figures and their sources, and the small grid. Read without torch, every
value checked, each problem one line naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from kd_cli.errors import KdError

COMPARES = ("best", "last")
MAX_SEEDS = 1000  # runs per cell: more is a typo (a table of 1000 seeds per cell is weeks of GPU time)


@dataclass(frozen=True)
class Pair:
    name: str
    teacher: str
    student: str


@dataclass(frozen=True)
class Published:
    score: float  # in the table's metric (top-1 %, mIoU %)
    source: str  # a key of TableRecipe.sources


# The scores a table compares: a summary's `best_<metric>` / `last_<metric>`, and how the metric is printed.
# (Here, not read from kd_cli.tasks: a table file is read and checked without importing torch.)
METRIC_LABELS = {"top1": "top-1", "miou": "mIoU", "map": "mAP"}


@dataclass
class TableRecipe:
    name: str
    path: Path
    teacher_recipe: list[str]
    method_recipes: list[list[str]]
    pairs: dict[str, Pair]
    methods: list[str]
    seeds: int
    compare: str
    tolerance: float
    sources: dict[str, str]
    published: dict[str, dict[str, Published]]  # method (or "teacher") -> pair -> figure
    small: dict[str, Any] = field(default_factory=dict)
    metric: str = "top1"

    @property
    def metric_label(self) -> str:
        return METRIC_LABELS[self.metric]

    def figure(self, method: str, pair: str) -> Published | None:
        return self.published.get(method, {}).get(pair)

    def shrunk(self) -> TableRecipe:
        """The --small grid: its pairs, methods and seeds, the rest as it is."""
        if not self.small:
            raise KdError(f"table {self.name} has no `small` section; run it whole or add one to {self.path}")
        pairs = {name: self.pairs[name] for name in self.small["pairs"]}
        return TableRecipe(
            self.name,
            self.path,
            self.teacher_recipe,
            self.method_recipes,
            pairs,
            list(self.small["methods"]),
            int(self.small["seeds"]),
            self.compare,
            self.tolerance,
            self.sources,
            self.published,
            self.small,
            self.metric,
        )


def builtin_tables() -> list[str]:
    return sorted(p.name[:-5] for p in files("kd_cli.commands.table").iterdir() if p.name.endswith(".yaml"))


def load_recipe(name: str) -> TableRecipe:
    """A built-in table by name (`cifar100`) or a YAML file of the same shape."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
        if not path.is_file():
            raise KdError(f"table file {path} does not exist")
    else:
        if name not in builtin_tables():
            raise KdError(f"unknown table '{name}' (built in: {', '.join(builtin_tables())}; or give a .yaml file)")
        path = Path(str(files("kd_cli.commands.table") / f"{name}.yaml"))
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise KdError(f"cannot read the table {path} ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise KdError(f"{path} is not a table description (a YAML mapping with pairs, methods, published)")
    return _parse(raw, path)


def _parse(raw: dict, path: Path) -> TableRecipe:
    def need(key: str, kind: type) -> Any:
        if not isinstance(raw.get(key), kind):
            raise KdError(f"{path}: `{key}` must be a {kind.__name__}")
        return raw[key]

    pairs = {}
    for name, pair in need("pairs", dict).items():
        if not (
            isinstance(pair, dict) and isinstance(pair.get("teacher"), str) and isinstance(pair.get("student"), str)
        ):
            raise KdError(f"{path}: pairs.{name} must give `teacher` and `student` architectures")
        pairs[str(name)] = Pair(str(name), pair["teacher"], pair["student"])
    sources = {str(k): str(v) for k, v in (raw.get("sources") or {}).items()}
    published: dict[str, dict[str, Published]] = {}
    for method, cells in (raw.get("published") or {}).items():
        published[str(method)] = {}
        for pair, cell in (cells or {}).items():
            if not (isinstance(cell, list) and len(cell) == 2 and isinstance(cell[0], (int, float))):
                raise KdError(f"{path}: published.{method}.{pair} must be [score, source], e.g. [73.33, repdistiller]")
            if cell[1] not in sources:
                raise KdError(f"{path}: published.{method}.{pair} cites '{cell[1]}', which `sources` does not name")
            published[str(method)][str(pair)] = Published(float(cell[0]), str(cell[1]))
    recipe = TableRecipe(
        name=str(raw.get("name") or path.stem),
        path=path,
        teacher_recipe=[str(o) for o in need("teacher_recipe", list)],
        method_recipes=[[str(o) for o in recipe] for recipe in need("method_recipes", list)],
        pairs=pairs,
        methods=[str(m) for m in need("methods", list)],
        seeds=int(need("seeds", int)),
        compare=str(raw.get("compare", "best")),
        tolerance=float(raw.get("tolerance", 0.5)),
        sources=sources,
        published=published,
        small=raw.get("small") or {},
        metric=str(raw.get("metric", "top1")),
    )
    if recipe.metric not in METRIC_LABELS:
        raise KdError(f"{path}: metric={recipe.metric} is not one of {', '.join(METRIC_LABELS)}")
    check_choices(recipe)
    unknown = [p for p in recipe.small.get("pairs", []) if p not in recipe.pairs]  # (the file's own pairs)
    if unknown:
        raise KdError(f"{recipe.path}: small.pairs names {', '.join(unknown)}, not in `pairs`")
    return recipe


def check_choices(recipe: TableRecipe) -> None:
    """The values a user may also set on the command line (pairs, methods, seeds, compare, tolerance)."""
    if recipe.compare not in COMPARES:
        raise KdError(f"compare={recipe.compare} is not one of {', '.join(COMPARES)}")
    if not 1 <= recipe.seeds <= MAX_SEEDS:
        raise KdError(f"seeds={recipe.seeds} must be a whole number from 1 to {MAX_SEEDS} (runs per cell)")
    if not 0 <= recipe.tolerance <= 100:
        raise KdError(f"tolerance={recipe.tolerance} must be a number from 0 to 100 (points of the table's metric)")
    if not recipe.methods:
        raise KdError("the table has no methods; give methods=kd,dkd,...")
    if not recipe.pairs:
        raise KdError("the table has no pairs")
