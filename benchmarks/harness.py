"""Timing harness: ratios of each locate/edit step to one bare batched forward pass.

Absolute times are noise on shared machines; ratios measured in one run are not. Each case is a
zero-argument callable; :func:`time_case` takes the best of ``repeat`` runs (after one warm-up
for cases marked ``warm``), so background load inflates no ratio by more than it inflates the floor.
"""

from __future__ import annotations

import gc
import json
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Case:
    name: str
    fn: Callable[[], object]
    target: float | None = None  # max ratio to the floor, when the issue sets one
    floor: str = "forward"  # which floor the ratio is taken against
    note: str = ""
    repeat: int = 2


@dataclass
class Row:
    name: str
    seconds: float
    ratio: float
    floor: str
    target: float | None
    met: bool | None
    note: str = ""


@dataclass
class Report:
    machine: dict
    n_prompts: int
    floors: dict[str, float]
    rows: list[Row] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({**asdict(self)}, indent=2)

    def table(self) -> str:
        head = f"{'case':<46} {'seconds':>9} {'ratio':>8} {'floor':>12} {'target':>8} {'met':>5}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            tgt = f"<={r.target:g}" if r.target is not None else ""
            met = "" if r.met is None else ("yes" if r.met else "NO")
            lines.append(f"{r.name:<46} {r.seconds:9.3f} {r.ratio:8.2f} {r.floor:>12} {tgt:>8} {met:>5}")
        return "\n".join(lines)


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def time_once(fn: Callable[[], object]) -> float:
    gc.collect()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def time_case(fn: Callable[[], object], repeat: int = 2) -> float:
    return min(time_once(fn) for _ in range(max(1, repeat)))


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_cases(report: Report, cases: list[Case], log: Callable[[str], None] = print) -> Report:
    for c in cases:
        try:
            s = time_case(c.fn, c.repeat)
        except Exception as err:  # a missing method must not hide the others' numbers
            log(f"{c.name}: failed: {err!r}")
            report.rows.append(Row(c.name, float("nan"), float("nan"), c.floor, c.target, None, f"failed: {err!r}"))
            continue
        ratio = s / report.floors[c.floor]
        met = None if c.target is None else ratio <= c.target
        report.rows.append(Row(c.name, s, ratio, c.floor, c.target, met, c.note))
        log(f"{c.name}: {s:.3f}s ratio {ratio:.2f}")
    return report


def write_report(report: Report, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(report.to_json())
    tmp.replace(out)
