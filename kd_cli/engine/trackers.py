"""Experiment trackers beside metrics.csv: TensorBoard, MLflow, Weights & Biases (offline by default).

`logger=` picks them; a list picks several (`logger=[tensorboard,mlflow]`: each option fills its own
key under `cfg.logger`). Every tracker receives the same three things: the resolved config (as
hyper-parameters) when the run opens, each metrics.csv row after its epoch (step = epoch), and the
saved model (model.safetensors + model.json) with the best score (best_top1, best_miou) at the end. Only rank 0 tracks.

Each backend is an optional extra of the package. `check_trackers` imports the selected ones before
any data is read, so a missing one is a one-line error with its install command, not a failure
after training. A tracked run's id is kept in `trackers.json` in the run directory, so
`resume=RUN_DIR` continues the same MLflow / W&B run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from omegaconf import DictConfig, OmegaConf

from kd_cli.engine.artifacts import META, WEIGHTS
from kd_cli.engine.files import read_json, write_json
from kd_cli.engine.rundir import RunDir
from kd_cli.errors import KdError
from kd_cli.overrides import flatten as dotted

if TYPE_CHECKING:
    from torch.utils.tensorboard.writer import FileWriter, SummaryWriter

log = logging.getLogger("kd")

STATE = "trackers.json"  # ids of the tracked runs, for resume
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"

# backend -> (extra, modules its use imports). The mlflow extra is mlflow-skinny plus the SQL store.
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tensorboard": ("tensorboard", ("tensorboard", "torch.utils.tensorboard")),
    "mlflow": ("mlflow", ("mlflow", "sqlalchemy", "alembic")),
    "wandb": ("wandb", ("wandb",)),
}


def selected(logger: DictConfig | None) -> list[str]:
    """The external trackers that `logger=` picked, in a fixed order (csv is not one: always written)."""
    if logger is None:
        return []
    return [name for name in EXTRAS if logger.get(name) is not None]


def check_trackers(logger: DictConfig | None) -> None:
    """Import each selected tracker's packages now: a missing extra is a one-line error before any work."""
    if logger is None:
        return  # no tracker selected
    for name in selected(logger):
        extra, modules = EXTRAS[name]
        if name == "mlflow" and not _is_database_uri(logger.mlflow.tracking_uri):
            modules = modules[:1]  # a tracking server: the client alone
        for module in modules:
            try:
                import_module(module)
            except ImportError as error:
                missing = getattr(error, "name", None) or module
                detail = "" if missing.split(".")[0] == module.split(".")[0] else f" ({error})"
                raise KdError(
                    f"logger={name} needs the {module.split('.')[0]} package: pip install 'kd-cli[{extra}]'{detail}"
                ) from None
    if logger is not None and logger.get("wandb") is not None:
        mode = logger.wandb.mode
        if mode not in ("offline", "online", "disabled"):
            raise KdError(f"logger.wandb.mode={mode} is not offline, online or disabled")


class Trackers:
    """The selected trackers behind one interface; a context manager that closes them with the run's
    outcome (FINISHED, FAILED on an exception, KILLED on an interrupt). No trackers: every call is a no-op.

    trackers.json keeps the tracked runs' ids and the last epoch handed to them, so a resumed run
    continues the same tracked runs and first logs the checkpointed epochs they missed."""

    def __init__(self, backends: list[Any] | None = None, state_path: Path | None = None, state: dict | None = None):
        self.backends = backends or []
        self.state_path = state_path
        self.state = {} if state is None else state

    def resume(self, history: list[dict[str, Any]]) -> None:
        """Before training goes on: the checkpointed epochs that the trackers have not received."""
        if not self.backends or not history:
            return
        with _held_interrupts():
            for backend in self.backends:
                for row in backend.missing(history, int(self.state[backend.key].get("epoch", 0))):
                    backend.log_metrics(*_metrics(row))
            self._save(int(history[-1]["epoch"]))

    def log_epoch(self, row: dict[str, Any]) -> None:
        """One metrics.csv row: every numeric column except `epoch`, which is the step."""
        if not self.backends:
            return
        with _held_interrupts():
            for backend in self.backends:
                backend.log_metrics(*_metrics(row))
            self._save(int(row["epoch"]))

    def log_model(self, run_dir: Path, best: float, best_epoch: int, metric: str = "top1") -> None:
        """The saved model files and the best test top-1, at the end of training."""
        with _held_interrupts():
            for backend in self.backends:
                backend.log_model(Path(run_dir), best, best_epoch, metric)

    def close(self, status: str = FINISHED) -> None:
        backends, self.backends = self.backends, []
        with _held_interrupts():
            for backend in backends:
                try:
                    backend.close(status)
                except Exception as error:  # noqa: BLE001 - closing one must not hide the run's own error
                    if status == FINISHED:
                        raise
                    log.warning(f"closing the {type(backend).__name__} failed too: {error}")

    def _save(self, epoch: int) -> None:
        for backend in self.backends:
            self.state[backend.key]["epoch"] = epoch
        if self.state_path is not None:
            write_json(self.state_path, self.state)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(FINISHED if kind is None else KILLED if issubclass(kind, KeyboardInterrupt) else FAILED)


def _metrics(row: dict[str, Any]) -> tuple[dict[str, float], int]:
    return {k: float(v) for k, v in row.items() if k != "epoch" and _is_number(v)}, int(row["epoch"])


def open_trackers(cfg: DictConfig, run: RunDir, is_main: bool = True) -> Trackers:
    """The trackers `cfg.logger` picks, each with a run opened and the config logged (rank 0 only)."""
    names = selected(cfg.get("logger"))
    if not names or not is_main:
        return Trackers()
    check_trackers(cfg.logger)
    config = cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=True))
    context = RunContext(run.path, run_name(cfg, run.path), config, _read_state(run.path))
    openers = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}
    trackers = Trackers(state_path=run.path / STATE, state=context.state)
    try:
        with _held_interrupts():
            for name in names:
                trackers.backends.append(openers[name](cfg.logger[name], context))
            write_json(run.path / STATE, context.state)
    except BaseException as error:
        trackers.close(KILLED if isinstance(error, KeyboardInterrupt) else FAILED)
        raise
    return trackers


@contextlib.contextmanager
def _held_interrupts() -> Iterator[None]:
    """Ctrl-C or SIGTERM in the middle of a tracker's write would leave its store half-written (an
    SQLite store stays locked, so the run could not even be marked KILLED): hold them until the write
    is done, then deliver them as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    signals = [signal.SIGINT, signal.SIGTERM]
    previous = {number: signal.signal(number, lambda number, frame: held.append(number)) for number in signals}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        if held:
            signal.raise_signal(held[0])


class Backend:
    """What every tracker does with a resumed run's history: log the epochs after the last one it got.
    `key`: its entry in cfg.logger and in trackers.json."""

    key = ""

    def missing(self, history: list[dict[str, Any]], done: int) -> list[dict[str, Any]]:
        return [row for row in history if int(row["epoch"]) > done]


class RunContext:
    def __init__(self, path: Path, name: str, config: dict, state: dict):
        self.path, self.name, self.config = path, name, config
        self.state = state
        self.tags = {
            "stage": str(config.get("stage")),
            "dataset": str(config.get("dataset", {}).get("name")),
            "method": str((config.get("method") or {}).get("name")),
            "run_dir": str(path.resolve()),
        }


def run_name(cfg: DictConfig, path: Path) -> str:
    """The run directory relative to paths.outputs (`distill/2026-11-28/10-00-00-123456`, `multirun/.../3`)."""
    try:
        return str(path.resolve().relative_to(Path(cfg.paths.outputs).resolve()))
    except ValueError:
        return str(path)


def flatten(config: dict) -> dict[str, Any]:
    """{'method': {'temperature': 4.0}} -> {'method.temperature': 4.0}; lists and None as JSON text (what
    trackers store as parameters)."""
    return {
        key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
        for key, value in dotted(config).items()
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_database_uri(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql")


def _read_state(path: Path) -> dict:
    try:
        return read_json(path / STATE)
    except (OSError, ValueError):
        return {}


def _resolve(base: Path, directory: str) -> Path:
    path = Path(directory).expanduser()
    return path if path.is_absolute() else base / path


def _file_writer(writer: SummaryWriter) -> FileWriter:
    """A SummaryWriter's event file writer (torch declares `file_writer` None: __init__ sets it later)."""
    return cast("FileWriter", writer.file_writer)


class TensorBoardTracker(Backend):
    """Event files under <run dir>/<dir>: scalars per epoch, the HParams plugin's records, text."""

    key = "tensorboard"

    def __init__(self, options: DictConfig, context: RunContext):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(_resolve(context.path, options.dir)))
        context.state.setdefault(self.key, {})
        params = {k: v for k, v in flatten(context.config).items() if not k.startswith("logger.")}
        metric = _metric_of(context.config)
        experiment, self._start, self._end = hparams(params, {f"best_{metric}": 0.0, f"test_{metric}": 0.0})
        events = _file_writer(self.writer)
        events.add_summary(experiment)
        events.add_summary(self._start)
        self.writer.add_text("config", "```\n" + OmegaConf.to_yaml(context.config) + "```", 0)
        self.step = 0

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.step = step
        self.writer.flush()

    def log_model(self, run_dir: Path, best: float, best_epoch: int, metric: str = "top1") -> None:
        self.writer.add_scalar(f"best_{metric}", best, self.step)
        meta = (run_dir / META).read_text()
        self.writer.add_text("model", f"weights: `{(run_dir / WEIGHTS).resolve()}`\n\n```\n{meta}\n```", self.step)

    def close(self, status: str) -> None:
        if status == FINISHED:
            _file_writer(self.writer).add_summary(self._end)  # hparams session end: success
        self.writer.close()


class MlflowTracker(Backend):
    """One MLflow run (MlflowClient: no global active run, so sweeps in one process stay separate)."""

    key = "mlflow"

    def __init__(self, options: DictConfig, context: RunContext):
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)  # schema creation notices on stderr
        uri = _absolute_sqlite_uri(options.tracking_uri)
        with _store_lock(uri):  # parallel jobs (joblib, submitit) may create the store at the same time
            self.client = MlflowClient(uri)
            experiment = self._experiment(options)
        previous = context.state.get("mlflow", {})
        resumed = previous.get("run_id") if previous.get("tracking_uri") == uri else None
        if resumed and self._exists(resumed):
            self.run_id = resumed
            self.client.update_run(resumed, status="RUNNING")
        else:
            tags = [RunTag(f"kd.{k}", v) for k, v in context.tags.items()]
            self.run_id = self.client.create_run(experiment, run_name=context.name).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flatten(context.config).items()]
            self.client.log_batch(self.run_id, params=params, tags=tags)
        if resumed != self.run_id:
            context.state["mlflow"] = {"tracking_uri": uri, "run_id": self.run_id}
        self.step = 0
        log.info(f"mlflow: run {self.run_id} in {uri} (experiment {options.experiment})")

    def _experiment(self, options: DictConfig) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(options.experiment)
        if found is not None:
            return found.experiment_id
        location = options.artifact_location
        if location and "://" not in location:
            location = Path(location).expanduser().resolve().as_uri()
        try:
            return self.client.create_experiment(options.experiment, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            found = self.client.get_experiment_by_name(options.experiment)
            if found is None:
                raise
            return found.experiment_id

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:
            return False

    def missing(self, history: list[dict[str, Any]], done: int) -> list[dict[str, Any]]:
        """Exact for MLflow: the epochs whose step the run does not hold."""
        logged = {metric.step for metric in self.client.get_metric_history(self.run_id, "train_loss")}
        return [row for row in history if int(row["epoch"]) not in logged]

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
        self.step = step

    def log_model(self, run_dir: Path, best: float, best_epoch: int, metric: str = "top1") -> None:
        self.client.log_metric(self.run_id, f"best_{metric}", best, step=self.step)
        self.client.set_tag(self.run_id, "kd.best_epoch", str(best_epoch))
        for name in (WEIGHTS, META):
            self.client.log_artifact(self.run_id, str(run_dir / name), artifact_path="model")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _absolute_sqlite_uri(uri: str) -> str:
    """sqlite:///relative/path.db -> sqlite:////absolute/path.db (the folder created), so every job of a
    sweep, wherever it runs, writes the same file, and the run logs say which."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri == prefix + ":memory:":
        return uri
    path = Path(uri[len(prefix) :]).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return prefix + str(path)


@contextlib.contextmanager
def _store_lock(uri: str):
    """An exclusive lock beside a SQLite store while its tables and the experiment are created."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: no lock (one job at a time there)
        yield
        return
    with open(uri[len("sqlite:///") :] + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class WandbTracker(Backend):
    """A W&B run written under the run directory (offline by default; `wandb sync` uploads it later)."""

    key = "wandb"

    def __init__(self, options: DictConfig, context: RunContext):
        import wandb

        directory = _resolve(context.path, options.dir)
        directory.mkdir(parents=True, exist_ok=True)
        resumed = context.state.get("wandb", {}).get("id")
        self.run = wandb.init(
            project=options.project,
            entity=options.entity,
            group=options.group,
            tags=list(options.tags) or None,
            name=context.name,
            dir=str(directory),
            mode=options.mode,
            config=context.config,
            id=resumed,
            resume="allow" if resumed else None,
            settings=wandb.Settings(silent=True, console="off"),
        )
        if resumed != self.run.id:
            context.state["wandb"] = {"id": self.run.id}
        self.mode = options.mode
        self.step = 0
        if options.mode == "offline":
            folder = Path(self.run.dir).parent  # <dir>/wandb/offline-run-<time>-<id>
            log.info(f"wandb: offline run in {folder}; upload it later with `wandb sync {folder}`")

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "epoch": step}, step=step)
        self.step = step

    def log_model(self, run_dir: Path, best: float, best_epoch: int, metric: str = "top1") -> None:
        import wandb

        self.run.summary.update({f"best_{metric}": best, "best_epoch": best_epoch})
        if self.mode == "disabled":
            return
        meta = read_json(run_dir / META)
        artifact = wandb.Artifact(
            f"model-{self.run.id}",
            type="model",
            metadata={k: meta.get(k) for k in ("arch", "kwargs", "num_classes", "dataset")},
        )
        for name in (WEIGHTS, META):  # immutable: referenced where they are, not copied to a staging folder
            artifact.add_file(str(run_dir / name), name=name, policy="immutable")
        self.run.log_artifact(artifact)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == FINISHED else 1)


def _metric_of(config: Mapping[str, Any]) -> str:
    """The run's headline metric (top1, miou): its data set's task's."""
    from kd_cli.data import dataset_task
    from kd_cli.tasks import get_task

    dataset = config.get("dataset")
    return get_task(dataset_task(str(dataset["name"])) if dataset is not None else "classification").metric
