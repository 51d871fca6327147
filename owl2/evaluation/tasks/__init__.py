"""The benchmark tasks; importing this package registers them (``owl2 eval --list`` shows them)."""

from owl2.evaluation.tasks import caption, choice, iqa, mme, shapes, vqa
from owl2.evaluation.tasks.base import TASKS, Sample, Task, TaskReport, get_task, register

__all__ = ["TASKS", "Sample", "Task", "TaskReport", "caption", "choice", "get_task", "iqa", "mme", "register", "shapes",
           "vqa"]
