"""The main job (``bias-lens run``): evaluate -> locate -> edit -> export -> figures -> report.

:class:`RunConfig` says what to run (``RunConfig.full()`` / ``RunConfig.quick()``);
:func:`run_pipeline` runs it with a per-stage result cache (:class:`StageCache`), so a re-run or
an interrupted run resumes, and writes the output folder atomically.
"""

from __future__ import annotations

from .config import RunConfig
from .plan import EditPlan, Where
from .runner import run_pipeline

__all__ = ["RunConfig", "EditPlan", "Where", "run_pipeline"]
