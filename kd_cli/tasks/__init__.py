"""Tasks: what differs between classification and segmentation and detection, in one place.

A data set names its task (`data.base.dataset_task`); the models and methods name the tasks they serve;
the loop, run directories, resume, sweeps, report and reproduce read the task's contract (`Task`) and
nothing else. A new task is one module here, registered with `register_task`.
"""

from __future__ import annotations

from kd_cli.tasks.base import TASKS, Score, Task, get_task, register_task, task_names
from kd_cli.tasks.classification import Classification
from kd_cli.tasks.detection import Detection
from kd_cli.tasks.segmentation import IGNORE_INDEX, Segmentation

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "Classification",
    "Detection",
    "Score",
    "Segmentation",
    "Task",
    "get_task",
    "register_task",
    "task_names",
]
