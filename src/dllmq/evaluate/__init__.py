"""Evaluation: tasks and metrics. `evaluate_mini` runs the offline mini benchmark (see mini.py)."""
from dllmq.evaluate.mini import TASKS as MINI_TASKS
from dllmq.evaluate.mini import evaluate_mini

__all__ = ["MINI_TASKS", "evaluate_mini"]
