"""GPU benchmark (issue 18 item 4): the CPU benchmark's cases on one CUDA device, in bf16.

For each model (default: the embedded SmolLM2-135M and a random-initialised ~1B Llama built from
a config, ``benchmarks/models.py``) it measures, in one process: the bare forward (the floor), the
FLOP bound of the layer score, every locate case of ``benchmarks/run.py`` (layer score, BMI, both
in one pass, neuron attribution, module scan, row/neuron gradients) plus attention value / query
neurons and bias tracing, the naive TransformerLens ``run_with_cache`` and nnsight per-prompt
anchors, and one masked fine-tuning step. The cases are ``benchmarks/cases.py``'s (the CPU
benchmark's own code); each model's report has the CPU benchmark's JSON schema
(``harness.Report``), written to ``OUT_DIR/gpu_<model>.json``.

Usage (from the repository root, venv active)::

    python benchmarks/gpu.py [--models smollm2,random-1b] [--dtype bfloat16] [--n 256]
                             [--module-n 32] [--anchor-n 32] [--out-dir benchmarks]
    python benchmarks/gpu.py --device cpu --tiny --out-dir /tmp/x   # the code path, on CPU (tests)

Exit status: 0 when every report was written; 2 when ``--device`` is CUDA and no CUDA device is
visible (one line on stderr says so; nothing is written).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import make_report, run_groups  # noqa: E402
from harness import Report, load_average, machine_info, write_report  # noqa: E402
from models import load, n_params  # noqa: E402

from bias_lens.benchmarks import sample_prompts  # noqa: E402
from bias_lens.loading import resolve_dtype  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = 2
NO_CUDA_MESSAGE = ("gpu.py: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, "
                   "or pass --device cpu --tiny to exercise the code path")
#: --tiny: a 2-layer random Llama, few prompts, few repeats: the whole code path in seconds
TINY = {"models": "random-tiny", "n": 8, "module_n": 4, "anchor_n": 2, "repeat": 1, "trace_items": 4, "n_noise": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring); ``--tiny`` overrides the sizes with :data:`TINY`."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="torch device (default cuda; cpu only to exercise the code)")
    ap.add_argument("--models", default="smollm2,random-1b", help="comma-separated: smollm2, random-<size>")
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    ap.add_argument("--n", type=int, default=256, help="prompts for every case")
    ap.add_argument("--module-n", type=int, default=32, help="prompts for the module scan (its own floor)")
    ap.add_argument("--anchor-n", type=int, default=32, help="prompts the naive anchors are timed on (scaled to --n)")
    ap.add_argument("--repeat", type=int, default=3, help="best of R runs for each locate case")
    ap.add_argument("--trace-items", type=int, default=8, help="StereoSet gender items for bias tracing")
    ap.add_argument("--n-noise", type=int, default=10, help="noise samples per bias-tracing restoration")
    ap.add_argument("--skip", default="", help="comma-separated groups to skip: module,grad,neurons,trace,anchors,ft")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random config and sizes (tests, CI)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks")
    a = ap.parse_args(argv)
    if a.tiny:
        for k, v in TINY.items():
            setattr(a, k, v)
    if min(a.n, a.module_n, a.anchor_n, a.repeat, a.trace_items, a.n_noise) < 1:
        ap.error("--n, --module-n, --anchor-n, --repeat, --trace-items, --n-noise must be >= 1")
    return a


def device_info(device: torch.device, dtype: torch.dtype) -> dict:
    """:func:`harness.machine_info` plus the accelerator's name, memory and the run's dtype."""
    info = machine_info() | {"device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 1024**3, 1),
                 "cuda": torch.version.cuda}
    return info


def bench_model(name: str, a: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Report:
    """Every case group on model ``name``; the report in the CPU benchmark's schema."""
    lm = load(name, dtype=dtype, device=str(device))
    prompts = sample_prompts("genbiaseval", "train", a.n, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    report = make_report(lm, prompts, a.module_n, device_info(device, dtype))
    report.extra |= {"model": name, "n_params": n_params(lm), "n_layers": lm.n_layers, "d_model": lm.d_model,
                     "d_vocab": lm.d_vocab}
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    run_groups(report, lm, prompts, repeat=a.repeat, module_n=a.module_n, anchor_n=a.anchor_n, skip=skip,
               trace_items=a.trace_items, n_noise=a.n_noise)
    if device.type == "cuda":
        report.extra["cuda_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
    report.machine["load_average_end"] = load_average()
    report.extra["wall_seconds"] = time.time() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (:data:`NO_CUDA` without a CUDA device)."""
    a = parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return NO_CUDA
    logging.basicConfig(level=logging.WARNING)
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = resolve_dtype(a.dtype)
    try:  # grad mode and the thread count are restored: main() may run inside another process (the tests)
        with torch.no_grad():
            for name in [m.strip() for m in a.models.split(",") if m.strip()]:
                report = bench_model(name, a, device, dtype)
                out = a.out_dir / f"gpu_{name}.json"
                write_report(report, out)
                print(f"\n{name} ({report.extra['n_params']:,} parameters, {report.machine['dtype']}, {device})")
                print("floors: " + ", ".join(f"{k} {v:.4f}s" for k, v in report.floors.items()))
                print(report.table())
                print(f"wrote {out}")
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
