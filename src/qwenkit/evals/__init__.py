"""Thinking-aware evaluation: `run_eval(EvalConfig(...)) -> EvalReport` (see runner, tasks, scorers, report).

Contract: the Python API `qwenkit eval` and `qwenkit compare` share; EvalReport.tasks[name].score, .n,
.cut_off_in_thinking_rate etc. summarise each task, EvalReport.samples holds every case's result.
"""

from qwenkit.evals.report import EvalReport, SampleResult, TaskReport
from qwenkit.evals.runner import EvalConfig, EvalError, run_eval
from qwenkit.evals.tasks import DatasetError

__all__ = ["DatasetError", "EvalConfig", "EvalError", "EvalReport", "SampleResult", "TaskReport", "run_eval"]
