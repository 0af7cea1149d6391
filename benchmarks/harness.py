"""Timing harness: ratios of each locate/edit step to one bare batched forward pass.

Absolute times are noise on shared machines; ratios measured in one run are not. Each case is a
zero-argument callable; :func:`time_case` takes the best of ``repeat`` runs (after one warm-up
for cases marked ``warm``), so background load inflates no ratio by more than it inflates the floor.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bias_lens.scoring import iter_batches


@dataclass
class Case:
    """One timed call. ``ratio = seconds / (per * floors[floor])``; ``per`` > 1 gives a per-unit
    ratio (e.g. per ablation of the module scan); ``scale`` multiplies the measured seconds first
    (e.g. a naive anchor timed on a subset of prompts and scaled to all of them)."""

    name: str
    fn: Callable[[], object]
    target: float | None = None  # max ratio to the floor, when the issue sets one
    floor: str = "forward"  # which floor the ratio is taken against
    note: str = ""
    repeat: int = 2
    per: float = 1.0
    scale: float = 1.0


@dataclass
class Row:
    name: str
    seconds: float
    ratio: float
    floor: str
    target: float | None
    met: bool | None
    note: str = ""
    better: str = "lower"  # "higher" for speed-ups (target is a minimum)


@dataclass
class Report:
    machine: dict
    n_prompts: int
    floors: dict[str, float]
    rows: list[Row] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({**asdict(self)}, indent=2, default=str)

    def add(self, name: str, seconds: float, ratio: float, floor: str, target: float | None,
            note: str = "", better: str = "lower") -> Row:
        met = None if target is None else (ratio <= target if better == "lower" else ratio >= target)
        row = Row(name, seconds, ratio, floor, target, met, note, better)
        self.rows.append(row)
        return row

    def table(self) -> str:
        head = f"{'case':<44} {'seconds':>9} {'ratio':>8} {'floor':>22} {'target':>8} {'met':>5}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            op = "<=" if r.better == "lower" else ">="
            tgt = f"{op}{r.target:g}" if r.target is not None else ""
            met = "" if r.met is None else ("yes" if r.met else "NO")
            lines.append(f"{r.name:<44} {r.seconds:9.3f} {r.ratio:8.3f} {r.floor:>22} {tgt:>8} {met:>5}")
        return "\n".join(lines)


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_average(),
        "shared_machine_note": "other jobs may share this box; absolute seconds are noise, ratios measured in one run are not",
    }


def _sync() -> None:
    """Wait for queued CUDA work (a no-op on CPU-only runs), so a timer reads finished work."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object]) -> float:
    gc.collect()
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def time_case(fn: Callable[[], object], repeat: int = 2) -> float:
    return min(time_once(fn) for _ in range(max(1, repeat)))


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def padded_shapes(lm, prompts: Sequence[str], batch_size: int = 32) -> list[tuple[int, int]]:
    """``(batch, padded length)`` of every batch the library's batcher forms for ``prompts``."""
    return [tuple(b.input_ids.shape) for b in iter_batches(lm.tokenizer, prompts, batch_size)]


def body_flops_per_token(lm, n_ctx: int) -> int:
    """Matmul FLOPs of the transformer body for one token attending over ``n_ctx`` positions.

    Every weight matrix of the blocks costs 2 x its size per token (a multiply-add per entry); the
    attention scores and the weighted values cost 2 x n_ctx x n_heads x d_head each, per layer.
    """
    weights = sum(p.numel() for blk in lm.layers for p in blk.parameters() if p.dim() >= 2)
    return 2 * weights + 4 * n_ctx * lm.n_heads * lm.d_head * lm.n_layers


def flop_counts(lm, prompts: Sequence[str], batch_size: int = 32) -> dict:
    """Matmul FLOPs of the bare forward and of the exact layer score (MSME Eq. 2) over ``prompts``.

    forward = body at every padded position + the unembedding at every padded position (what the
    HF LM head computes); layer score = the same body + (n_layers + 1) unembeddings per prompt, at
    its last real token: the FLOP lower bound of one full-vocabulary softmax per layer per prompt.
    ``bound_ratio`` = layer score / forward, the cost the FLOPs alone imply relative to the forward.
    """
    unembed = 2 * lm.unembed.weight.numel()
    shapes = padded_shapes(lm, prompts, batch_size)
    body = sum(b * t * body_flops_per_token(lm, t) for b, t in shapes)
    forward = body + sum(b * t for b, t in shapes) * unembed
    layer = body + (lm.n_layers + 1) * len(prompts) * unembed
    return {"body": body, "unembed_per_row": unembed, "forward": forward, "layer_score": layer,
            "padded_tokens": sum(b * t for b, t in shapes), "bound_ratio": layer / forward}


def run_cases(report: Report, cases: list[Case], log: Callable[[str], None] = print) -> Report:
    for c in cases:
        try:
            s = time_case(c.fn, c.repeat) * c.scale
        except Exception as err:  # a missing method must not hide the others' numbers
            log(f"{c.name}: failed: {err!r}")
            report.add(c.name, float("nan"), float("nan"), c.floor, c.target, f"failed: {err!r}")
            continue
        ratio = s / (c.per * report.floors[c.floor])
        report.add(c.name, s, ratio, c.floor if c.per == 1 else f"{c.floor} x{c.per:g}", c.target, c.note)
        log(f"{c.name}: {s:.3f}s ratio {ratio:.3f}")
    return report


def write_report(report: Report, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(report.to_json())
    tmp.replace(out)
