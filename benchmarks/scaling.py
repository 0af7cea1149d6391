"""Scaling mode (issue 18 item 2): locate cost relative to the bare forward as the model and the
prompt count grow, on random-initialised Llama configs (``benchmarks/models.py``: 135m, 360m, 1b).

Every (size, N) runs in a fresh subprocess (as ``run.py``'s RSS measurement does), which loads the
model, times the bare forward floor and the locate cases of ``cases.locate_cases`` (layer score,
BMI, both in one pass, neuron attribution) over the same N prompts, adds the layer score's FLOP
bound (``cases.add_flop_floor``), and reports its peak RSS (VmHWM, per process image) and, on
CUDA, the peak allocated memory. N > 1,026 (the GenBiasEval train split) repeats the split
cyclically: a prompt's cost does not depend on the others.

Usage (from the repository root, venv active)::

    python benchmarks/scaling.py [--sizes 135m,360m] [--n 256] [--threads 1] [--device cpu]
                                 [--dtype float32] [--repeat 1] [--out benchmarks/scaling.json]
    python benchmarks/scaling.py --sizes 135m,360m,1b --n 256,1024,4096 --device cuda --dtype bfloat16

Writes ``{"runs": [report, ...]}`` (each a ``harness.Report`` dict, the CPU benchmark's schema)
and prints a markdown table (ratios to the forward, peak memory).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from anchors import bare_forward  # noqa: E402
from cases import FLOP_FLOOR, add_bound_rows, add_flop_floor, locate_cases  # noqa: E402
from harness import Report, machine_info, run_cases, time_case  # noqa: E402
from models import n_params, random_llama  # noqa: E402
from run import vm_hwm_gb  # noqa: E402

from bias_lens.benchmarks import sample_prompts  # noqa: E402
from bias_lens.loading import resolve_dtype  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
POOL = 1026  # GenBiasEval train prompts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="135m,360m", help="comma-separated sizes of benchmarks/models.py")
    ap.add_argument("--n", default="256", help="comma-separated prompt counts (e.g. 256,1024,4096)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    ap.add_argument("--repeat", type=int, default=1, help="best of R runs per case (the floor: best of R + 1)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "scaling.json")
    ap.add_argument("--child", nargs=2, metavar=("SIZE", "N"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def prompts_for(n: int) -> list[str]:
    """``n`` GenBiasEval train prompts; past the split's size it repeats cyclically."""
    pool = sample_prompts("genbiaseval", "train", min(n, POOL), seed=0)
    return (pool * (n // len(pool) + 1))[:n]


def child(size: str, n: int, a: argparse.Namespace) -> Report:
    """One (size, N) measurement in this (fresh) process."""
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    dtype, device = resolve_dtype(a.dtype), torch.device(a.device)
    lm = random_llama(size, dtype=dtype, device=str(device))
    after_load = vm_hwm_gb()
    prompts = prompts_for(n)
    bare_forward(lm, prompts[:32])  # warm-up
    report = Report(machine_info() | {"device": str(device), "dtype": a.dtype}, n,
                    {"forward": time_case(lambda: bare_forward(lm, prompts), a.repeat + 1)})
    add_flop_floor(report, lm, prompts)
    run_cases(report, locate_cases(lm, prompts, a.repeat), log=lambda s: print(s, file=sys.stderr))
    add_bound_rows(report)
    report.extra |= {"size": size, "n_params": n_params(lm), "vmhwm_after_load_gb": after_load,
                     "peak_rss_gb": vm_hwm_gb()}
    if device.type == "cuda":
        report.extra["cuda_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
    return report


def run_child(size: str, n: int, a: argparse.Namespace) -> dict:
    """Run :func:`child` in a fresh interpreter; its report as a dict."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", size, str(n), "--threads", str(a.threads),
           "--device", a.device, "--dtype", a.dtype, "--repeat", str(a.repeat)]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"scaling child {size} x{n} failed (rc {res.returncode}): {res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["extra"]["subprocess_seconds"] = time.perf_counter() - t
    return out


def table(runs: list[dict]) -> str:
    """Markdown: one line per (size, N): ratios to the forward (and the layer score to its FLOP bound)."""
    def key(name: str) -> str:  # "neuron_attribution (all 46,080 neurons)" -> its method, the same at every size
        return name.split(" (")[0]

    names = [key(r["name"]) for r in runs[0]["rows"] if not r["name"].startswith(" ")]
    head = ["size", "params", "N", "forward s", *names, "layer / FLOP bound", "peak RSS GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        by = {r["name"]: r for r in run["rows"]} | {key(r["name"]): r for r in run["rows"]}
        bound = by.get("  layer_scale vs FLOP bound", {}).get("ratio", float("nan"))
        cells = [run["extra"]["size"], f"{run['extra']['n_params'] / 1e6:.0f}M", str(run["n_prompts"]),
                 f"{run['floors']['forward']:.2f}", *[f"{by[n]['ratio']:.2f}" for n in names],
                 f"{bound:.2f} (bound {run['floors'][FLOP_FLOOR] / run['floors']['forward']:.2f}x fwd)",
                 f"{run['extra']['peak_rss_gb']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Every (size, N) in its own subprocess; writes the JSON and prints the table."""
    a = parse_args(argv)
    if a.child:
        print(child(a.child[0], int(a.child[1]), a).to_json().replace("\n", " "))
        return 0
    runs = []
    for size in [s.strip() for s in a.sizes.split(",") if s.strip()]:
        for n in [int(x) for x in a.n.split(",") if x.strip()]:
            runs.append(run_child(size, n, a))
            print(f"{size} x{n}: done in {runs[-1]['extra']['subprocess_seconds']:.0f}s", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(f".{a.out.name}.tmp")
    tmp.write_text(json.dumps({"runs": runs}, indent=2))
    tmp.replace(a.out)
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
