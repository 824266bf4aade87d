"""DDP from SLURM's task variables: `srun` (or Hydra's submitit launcher with several tasks) starts
one kd process per task, on one or more nodes, and each must know its rank in the job step.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a SLURM step sets its own
variables instead. When kd runs as one of several tasks of a step (SLURM_STEP_NUM_TASKS > 1) and
torchrun's are absent, they are derived from SLURM's, so the rest of kd (rank 0 writes the run,
LOCAL_RANK picks the GPU, gloo/nccl join at MASTER_ADDR:MASTER_PORT) works the same. A shell of an
interactive allocation is not a step, so it is left alone; KD_SLURM_DDP=0 turns this off.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping

PORT_BASE, PORT_SPAN = 20000, 10000  # the job's port: PORT_BASE + job id % PORT_SPAN, as every task computes it


def adopt_slurm_tasks(env: MutableMapping[str, str] = os.environ) -> bool:
    """Export torchrun's variables from SLURM's when kd is one of several tasks of a job step."""
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if "RANK" in env or tasks < 2 or "SLURM_PROCID" not in env or env.get("KD_SLURM_DDP") == "0":
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = str(tasks)
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")))
    env.setdefault("MASTER_PORT", str(PORT_BASE + int(env.get("SLURM_JOB_ID", "0") or 0) % PORT_SPAN))
    return True


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[03-05,09],cpu01` -> `gpu03`; empty -> localhost."""
    first = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if first is None:
        return "127.0.0.1"
    prefix, ranges = first.group(1), first.group(3)
    if not ranges:
        return prefix
    return prefix + re.split(r"[,-]", ranges)[0]
