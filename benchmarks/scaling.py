"""Scaling mode (issue 18 item 2): locate cost relative to the bare forward as the model and the
prompt count grow, on random-initialised Llama configs (``benchmarks/models.py``: 135m, 360m, 1b).

Every (size, N) runs in a fresh subprocess (as ``run.py``'s RSS measurement does), which loads the
model, times the bare forward floor and the locate cases of ``cases.locate_cases`` (layer score,
BMI, both in one pass, neuron attribution) over the same N prompts, adds the layer score's FLOP
bound (``cases.add_flop_floor``), then one masked fine-tuning step (``cases.ft_case``: a neuron
mask of the last ``mlp.down`` chosen by ``neuron_scale`` on the step's batch of ``--ft-n`` prompts,
against a bare forward+backward of that batch with every parameter requiring grad), and reports
the locate phase's peak RSS (VmHWM after a reset past model construction, per process image),
the fine-tuning step's own peak and, on CUDA, the peak allocated memory. N > 1,026 (the GenBiasEval train split) repeats the split
cyclically: a prompt's cost does not depend on the others.

Usage (from the repository root, venv active)::

    python benchmarks/scaling.py [--sizes 135m,360m] [--n 256] [--threads 1] [--device cpu]
                                 [--dtype float32] [--repeat 1] [--ft-n 32] [--out benchmarks/scaling.json]
                                 [--append]   # add to the runs already in --out
    python benchmarks/scaling.py --table      # the markdown table of --out
    python benchmarks/scaling.py --sizes 135m,360m,1b --n 256,1024,4096 --device cuda --dtype bfloat16

Writes ``{"runs": [report, ...]}`` (each a ``harness.Report`` dict, the CPU benchmark's schema)
and prints a markdown table (ratios to the forward, peak memory).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from anchors import bare_forward  # noqa: E402
from cases import FLOP_FLOOR, add_bound_rows, add_flop_floor, add_state_row, ft_case, locate_cases  # noqa: E402
from harness import Report, load_average, machine_info, run_cases, time_case  # noqa: E402
from locate_rss import reset_hwm, vm_rss_gb  # noqa: E402
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
    ap.add_argument("--ft-n", type=int, default=32, help="prompts in the fine-tuning step's batch; 0 skips the step")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "scaling.json")
    ap.add_argument("--append", action="store_true", help="add the runs to those already in --out")
    ap.add_argument("--table", action="store_true", help="print the table of --out and exit")
    ap.add_argument("--child", nargs=2, metavar=("SIZE", "N"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def prompts_for(n: int) -> list[str]:
    """``n`` GenBiasEval train prompts; past the split's size it repeats cyclically."""
    pool = sample_prompts("genbiaseval", "train", min(n, POOL), seed=0)
    return (pool * (n // len(pool) + 1))[:n]


def child(size: str, n: int, a: argparse.Namespace) -> Report:
    """One (size, N) measurement in this (fresh) process.

    Memory: RSS after loading, then the high-water mark is reset (``locate_rss.reset_hwm``) so that
    ``peak_rss_gb`` is the locate phase's own peak (the forward floor and every locate case), not
    model construction's transient; it is reset again before the fine-tuning step
    (``peak_rss_ft_gb``), whose fwd+bwd floor holds a gradient for every parameter.
    """
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    dtype, device = resolve_dtype(a.dtype), torch.device(a.device)
    lm = random_llama(size, dtype=dtype, device=str(device))
    prompts = prompts_for(n)
    gc.collect()
    mem = {"vmhwm_after_load_gb": vm_hwm_gb(), "rss_after_load_gb": vm_rss_gb(), "hwm_reset": reset_hwm()}
    bare_forward(lm, prompts[:32])  # warm-up
    report = Report(machine_info() | {"device": str(device), "dtype": a.dtype}, n,
                    {"forward": time_case(lambda: bare_forward(lm, prompts), a.repeat + 1)})
    add_flop_floor(report, lm, prompts)
    run_cases(report, locate_cases(lm, prompts, a.repeat), log=lambda s: print(s, file=sys.stderr))
    add_bound_rows(report)
    mem["peak_rss_gb"] = vm_hwm_gb()
    # the floor once more after the cases: forward_end / forward shows how far the shared box's load drifted
    report.extra["forward_end_s"] = time_case(lambda: bare_forward(lm, prompts), 1)
    if a.ft_n > 0:  # one masked fine-tuning step vs a bare fwd+bwd of the same batch
        gc.collect()
        mem["rss_before_ft_gb"], _ = vm_rss_gb(), reset_hwm()
        with torch.enable_grad():
            cases = [ft_case(report, lm, prompts[: a.ft_n], batch_n=a.ft_n)]
        run_cases(report, cases, log=lambda s: print(s, file=sys.stderr))
        add_state_row(report)
        mem["peak_rss_ft_gb"] = vm_hwm_gb()
    report.extra |= {"size": size, "n_params": n_params(lm), "load_average_end": load_average(), **mem}
    if device.type == "cuda":
        report.extra["cuda_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
    return report


def run_child(size: str, n: int, a: argparse.Namespace) -> dict:
    """Run :func:`child` in a fresh interpreter; its report as a dict."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", size, str(n), "--threads", str(a.threads),
           "--device", a.device, "--dtype", a.dtype, "--repeat", str(a.repeat), "--ft-n", str(a.ft_n)]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"scaling child {size} x{n} failed (rc {res.returncode}): {res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["extra"]["subprocess_seconds"] = time.perf_counter() - t
    return out


#: table columns: (header, row name prefix) of the cases, ratio to their floor
COLUMNS = (("layer_scale", "layer_scale"), ("bmi", "bmi"), ("layer+bmi", "layer_scale_and_bmi"),
           ("neuron_attr", "neuron_attribution"), ("layer / FLOP bound", "  layer_scale vs FLOP bound"),
           ("ft step / fwd+bwd", "masked_finetune"))


def table(runs: list[dict]) -> str:
    """Markdown: one line per run: ratios to the forward (the layer score also to its FLOP bound, the
    fine-tuning step to a bare fwd+bwd of its batch), peak RSS of the locate phase, machine load."""
    head = ["size", "dtype", "params", "N", "forward s", *[c[0] for c in COLUMNS], "FLOP bound / fwd",
            "RSS after load GB", "peak RSS locate GB", "load avg start-end", "fwd end / start"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        ex = run["extra"]

        def ratio(prefix: str) -> str:
            r = next((r for r in run["rows"] if r["name"].startswith(prefix)), None)
            return "—" if r is None else f"{r['ratio']:.2f}"

        loads = f"{run['machine'].get('load_average_start', ['?'])[0]}-{(ex.get('load_average_end') or ['?'])[0]}"
        cells = [ex["size"], run["machine"].get("dtype", "float32"), f"{ex['n_params'] / 1e6:.0f}M",
                 str(run["n_prompts"]), f"{run['floors']['forward']:.1f}", *[ratio(c[1]) for c in COLUMNS],
                 f"{run['floors'][FLOP_FLOOR] / run['floors']['forward']:.2f}",
                 f"{ex.get('rss_after_load_gb', float('nan')):.2f}", f"{ex['peak_rss_gb']:.2f}", loads,
                 f"{ex['forward_end_s'] / run['floors']['forward']:.2f}" if "forward_end_s" in ex else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flop_table(runs: list[dict]) -> str:
    """Markdown: each ratio divided by the ratio its matmul FLOPs alone predict (``harness.flop_counts``).

    BMI and neuron attribution run the body only (no unembedding): predicted ``body / forward``;
    the layer score: its FLOP bound (body + (n_layers+1) unembeddings per prompt) / forward. A
    method whose cost follows its FLOPs gives the same normalised value at every size.
    """
    head = ["size", "dtype", "N", "body / fwd FLOPs", "unembed share of fwd", "layer / bound", "bmi / body",
            "neuron_attr / body"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        fl = run["extra"]["flops"]
        body = fl["body"] / fl["forward"]

        def norm(prefix: str, pred: float) -> str:
            r = next((r for r in run["rows"] if r["name"].startswith(prefix)), None)
            return "—" if r is None else f"{r['ratio'] / pred:.2f}"

        lines.append("| " + " | ".join([
            run["extra"]["size"], run["machine"].get("dtype", "float32"), str(run["n_prompts"]), f"{body:.3f}",
            f"{1 - body:.3f}", norm("layer_scale", fl["bound_ratio"]), norm("bmi", body),
            norm("neuron_attribution", body)]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Every (size, N) in its own subprocess; writes the JSON and prints the table."""
    a = parse_args(argv)
    if a.child:
        print(child(a.child[0], int(a.child[1]), a).to_json().replace("\n", " "))
        return 0
    if a.table:
        runs = json.loads(a.out.read_text())["runs"]
        print(table(runs) + "\n\n" + flop_table(runs))
        return 0
    runs = json.loads(a.out.read_text())["runs"] if a.append and a.out.exists() else []
    for size in [s.strip() for s in a.sizes.split(",") if s.strip()]:
        for n in [int(x) for x in a.n.split(",") if x.strip()]:
            runs.append(run_child(size, n, a))
            print(f"{size} x{n}: done in {runs[-1]['extra']['subprocess_seconds']:.0f}s", flush=True)
            write_runs(a.out, runs)  # after every run: a long sweep keeps what it measured
    print(table(runs) + "\n\n" + flop_table(runs))
    return 0


def write_runs(out: Path, runs: list[dict]) -> None:
    """``{"runs": runs}`` to ``out`` atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps({"runs": runs}, indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    sys.exit(main())
