"""The teacher's outputs, computed once per data stream and read by every later run that sees it.

At step k of epoch e a distillation run shows its teacher a batch that is a pure function of the
training data, the augmentation, the stream's seed (`dataset.aug_seed`, `seed` unless set), the batch
size and the process's shard. Runs that agree on these and on the teacher (its weights, the conversion
to its input form, precision, memory format, device type, torch version) get the same teacher logits
to the bit. So the first such run stores them, one file per epoch, and later runs read them instead
of running the teacher: a sweep over temperatures or loss weights pays for the teacher once.

Exactness is checked, not assumed: each stored batch carries a checksum of the images it was computed
from, compared (on the device, without a per-step sync) with the batch the reading run has; a
mismatch fails the epoch in one line rather than training on another batch's logits.

What is stored is what the method reads (`Distiller.teacher_cache_outputs`): the logits, and for a
feature method whose teacher features are small vectors (pooled embeddings: PKT, RKD, CC, CRD) those
features too; feature maps are not stored (a CIFAR epoch of stage maps would take gigabytes).

Layout: `<dir>/<key>/epoch-<e>.safetensors` (the epoch's outputs, batch by batch, and the checksums) and
`key.json` (what the key stands for, for `kd cache ls`). An epoch file is written whole and atomically
by the one process that holds its lock; a run that finds it locked computes that epoch itself without
storing it (no waiting, no half files). A cache that cannot be read or written costs speed, never the
run: a broken file is recomputed. After each write, whole entries are evicted, least recently used
first, until the cache fits its size bound.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_cli.data.on_disk import brief
from kd_cli.engine.files import atomic_write, write_json
from kd_cli.errors import KdError, warn

KEY_FILE = "key.json"


def teacher_identity(teacher: nn.Module) -> str:
    """sha256 of what decides the teacher's outputs besides its input: class, weights and buffers
    (names, dtypes, shapes, bytes), and the forward pre-hooks (the conversion to its input form)."""
    from kd_cli.engine.artifacts import weights_for_file

    digest = hashlib.sha256(type(teacher).__qualname__.encode())
    tensors, header = weights_for_file(teacher)  # as saved: an int8 model's packed state as plain tensors too
    digest.update(json.dumps(header, sort_keys=True).encode())
    for name, tensor in tensors.items():
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    for module in teacher.modules():
        for hook in module._forward_pre_hooks.values():
            digest.update(repr(hook).encode())
    return digest.hexdigest()


def cache_key(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class EpochRecord:
    outputs: list[tuple[torch.Tensor, ...]]  # per step: (logits, *features)
    checksums: list[torch.Tensor]


class TeacherCache:
    """One data stream's teacher outputs. The loop calls `start`, then `epoch` around each epoch; the
    method asks `outputs(images, compute)` (or `logits(images, teacher)`) once per training step, in order."""

    def __init__(self, root: Path, description: dict[str, Any], max_bytes: int):
        self.root, self.description, self.max_bytes = Path(root), description, max_bytes
        self.steps = 0
        self.key = ""
        self.entry = self.root
        self.names: list[str] = ["logits"]  # what is stored, in order: logits, then the named features
        self.stored: tuple[list[torch.Tensor], torch.Tensor] | None = None  # (outputs, checksums) of this epoch
        self.filling: EpochRecord | None = None
        self.lock: FileLock | None = None
        self.mismatch: torch.Tensor | None = None
        self.current_epoch, self.cursor = 0, 0
        self.hits = self.misses = 0
        self._broken = False

    # -- the loop's side -------------------------------------------------------------------------
    def start(self, steps: int, features: list[str] | None = None) -> None:
        """The number of training steps per epoch completes the key (a shorter epoch is another stream),
        with the teacher features stored beside the logits (their layer names)."""
        self.steps = steps
        self.names = ["logits", *(f"feature:{name}" for name in features or [])]
        self.description = {**self.description, "steps_per_epoch": steps, "outputs": self.names}
        self.key = cache_key(self.description)
        self.entry = self.root / self.key

    @contextlib.contextmanager
    def epoch(self, epoch: int, device: torch.device) -> Iterator[None]:
        self.begin_epoch(epoch, device)
        try:
            yield
        except BaseException:
            self.abandon_epoch()
            raise
        self.end_epoch()

    def begin_epoch(self, epoch: int, device: torch.device) -> None:
        self.current_epoch, self.cursor, self.filling = epoch, 0, None
        self.stored = self._read(epoch, device)
        if self.stored is None and self._lock_for_filling(epoch):
            self.stored = self._read(epoch, device, quiet=True)  # (another run may have stored it meanwhile)
            if self.stored is None:
                self.filling = EpochRecord([], [])
            else:
                self._release()
        self.mismatch = torch.zeros((), dtype=torch.bool, device=device) if self.stored is not None else None

    def end_epoch(self) -> None:
        """After a whole epoch: check what was read, store what was computed (all steps, or nothing)."""
        try:
            if self.mismatch is not None and bool(self.mismatch):
                raise KdError(
                    f"the teacher cache entry {self.entry} holds outputs for other images than this "
                    f"run's epoch {self.current_epoch}; remove it (kd cache clear) or set "
                    f"teacher_cache.enabled=false"
                )
            if self.stored is not None:
                self.hits += 1
            elif self.filling is not None and len(self.filling.outputs) == self.steps:
                self._write(self.current_epoch, self.filling)
                self.misses += 1
            else:
                self.misses += 1
        finally:
            self._release()
            self.stored, self.filling = None, None

    def abandon_epoch(self) -> None:
        """The epoch stopped part-way (an error, an interrupt): nothing of it is stored."""
        self._release()
        self.stored, self.filling = None, None

    # -- the method's side -----------------------------------------------------------------------
    def logits(self, images: torch.Tensor, teacher: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return self.outputs(images, lambda batch: (teacher(batch),))[0]

    def outputs(
        self, images: torch.Tensor, compute: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, ...]:
        """This step's (logits, *features): stored ones, or `compute(images)` (stored when filling)."""
        step, self.cursor = self.cursor, self.cursor + 1
        checksum = images.detach().double().sum()
        stored = self.stored
        if stored is not None and step < self.steps and len(stored[0][0][step]) == len(images):
            assert self.mismatch is not None  # begin_epoch sets it whenever something is stored
            self.mismatch |= stored[1][step] != checksum
            return tuple(tensor[step] for tensor in stored[0])
        with torch.no_grad():
            computed = tuple(compute(images))
        if len(computed) != len(self.names):
            raise KdError(
                f"the teacher cache stores {', '.join(self.names)} but the method gave {len(computed)} "
                "outputs; this is a bug in the method's teacher_cache_outputs"
            )
        if self.filling is not None:
            self.filling.outputs.append(tuple(t.detach() for t in computed))
            self.filling.checksums.append(checksum)
        return computed

    # -- files -----------------------------------------------------------------------------------
    def _path(self, epoch: int) -> Path:
        return self.entry / f"epoch-{epoch:05d}.safetensors"

    def _read(
        self, epoch: int, device: torch.device, quiet: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """The epoch's (outputs, checksums), or None: absent, or damaged (then recomputed, with a warning)."""
        path = self._path(epoch)
        if not path.is_file():
            return None
        try:
            outputs, checksums = self._load(path, device)
        except Exception as error:  # noqa: BLE001 - a broken cache file is recomputed, never fatal
            if not quiet:
                warn(f"teacher cache: {path} is damaged ({brief(error)}); this run computes that epoch again")
            return None
        self._mark_used()
        return outputs, checksums

    def _load(self, path: Path, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Read and verify: the key and the outputs' sha256 written with them, their shapes, finite values."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as stored:
            metadata = stored.metadata() or {}
            outputs = [stored.get_tensor(name) for name in self.names]
            checksums = stored.get_tensor("checksums")
        if metadata.get("key") != self.key or metadata.get("outputs_sha256") != _sha256_all(outputs):
            raise ValueError("its contents do not match the checksum stored with them")
        batch = self.description.get("stream", {}).get("batch_size")
        for name, tensor in zip(self.names, outputs):
            if (
                tensor.dim() < 3
                or tensor.shape[0] != self.steps
                or (batch and tensor.shape[1] != batch)
                or not torch.isfinite(tensor).all()
            ):
                raise ValueError(f"{name} of shape {tuple(tensor.shape)} for {self.steps} steps of {batch}")
        if checksums.shape != (self.steps,):
            raise ValueError(f"{tuple(checksums.shape)} checksums for {self.steps} steps")
        return [tensor.to(device) for tensor in outputs], checksums.to(device)

    def _lock_for_filling(self, epoch: int) -> bool:
        if self._broken:
            return False
        try:
            self.entry.mkdir(parents=True, exist_ok=True)
            self._mark_used()
            lock = FileLock(self.entry / f".epoch-{epoch:05d}.lock")
            if not lock.try_acquire():
                return False  # another run fills this epoch now: compute it here too, store nothing
            self.lock = lock
            return True
        except OSError as error:
            self._give_up(error)
            return False

    def _write(self, epoch: int, record: EpochRecord) -> None:
        from safetensors.torch import save

        outputs = [torch.stack([step[i] for step in record.outputs]).cpu().contiguous() for i in range(len(self.names))]
        tensors = {**dict(zip(self.names, outputs)), "checksums": torch.stack(record.checksums).cpu()}
        metadata = {"key": self.key, "outputs_sha256": _sha256_all(outputs)}
        try:
            atomic_write(self._path(epoch), lambda tmp: tmp.write_bytes(save(tensors, metadata=metadata)))
            self._mark_used()
            evict(self.root, self.max_bytes, keep=self.key)
        except OSError as error:
            self._give_up(error)

    def _mark_used(self) -> None:
        """key.json's mtime is the entry's last use (for eviction); rewritten when missing or damaged."""
        key_file = self.entry / KEY_FILE
        try:
            json.loads(key_file.read_text())
            os.utime(key_file)
        except (OSError, ValueError):
            with contextlib.suppress(OSError):
                write_json(key_file, {**self.description, "key": self.key})

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _give_up(self, error: OSError) -> None:
        if not self._broken:
            warn(
                f"the teacher cache at {self.root} cannot be written ({error.strerror or error}); "
                f"this run computes its teacher's outputs without storing them"
            )
        self._broken = True

    def summary(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "dir": str(self.root),
            "outputs": self.names,
            "epochs_read": self.hits,
            "epochs_computed": self.misses,
        }


class FileLock:
    """A non-blocking flock on a small file, removed on release. (Removing it races with a process that
    opened it just before: that one may then fill the same epoch too, which costs work, not exactness,
    since the file it writes is the same and lands by an atomic rename.)"""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        try:
            import fcntl
        except ImportError:  # (no flock: every run computes what it cannot read)
            return False
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = None


def _sha256_all(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class CacheEntry:
    path: Path
    description: dict[str, Any]
    epochs: int
    bytes: int
    last_used: float


def entries(root: Path) -> list[CacheEntry]:
    """Every entry under `root` (a folder with a key.json or epoch files), least recently used first.
    An entry whose key.json is damaged is listed too, with what is known of it, so it can be removed."""
    found = []
    for folder in sorted(Path(root).glob("*")) if Path(root).is_dir() else []:
        key_file = folder / KEY_FILE
        try:
            files = list(folder.glob("epoch-*.safetensors")) if folder.is_dir() else []
            if not files and not key_file.is_file():
                continue
            try:
                description = json.loads(key_file.read_text())
            except (OSError, ValueError):
                description = {}
            size = sum(f.stat().st_size for f in files)
            used = key_file if key_file.exists() else max(files, key=lambda f: f.stat().st_mtime)
            last_used = used.stat().st_mtime
            found.append(CacheEntry(folder, description, len(files), size, last_used))
        except OSError:
            continue
    return sorted(found, key=lambda e: e.last_used)


def evict(root: Path, max_bytes: int, keep: str | None = None) -> list[Path]:
    """Remove whole entries, least recently used first, until the cache holds at most `max_bytes`."""
    found = entries(root)
    total = sum(e.bytes for e in found)
    removed = []
    for entry in found:
        if total <= max_bytes:
            break
        if entry.path.name == keep:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        total -= entry.bytes
        removed.append(entry.path)
    return removed
