"""On-demand performance benchmark of issue 7 (not part of the pytest run).

One process, one model (the embedded SmolLM2-135M), the same N GenBiasEval train prompts
(``sample_prompts("genbiaseval", "train", N, seed=0)``) for every case. Every locate/edit cost is
reported as a ratio to a floor measured in the same run (absolute seconds are noise on a shared
box; ratios measured side by side are much less so):

* ``forward``: bare batched HF forward over the N prompts, batch 32, no grad, best of 3;
* ``forward@M``: the same over the first M prompts (floor of the module scan, run on fewer prompts);
* ``fwd+bwd@32``: one bare forward+backward of 32 prompts with every parameter requiring grad;
* ``flop bound (layer score)``: the forward's seconds x the FLOP ratio of the exact layer score
  (body + n_layers+1 unembeddings per prompt at its last token) to the forward (body + one
  unembedding per padded position), ``harness.flop_counts``; the layer-score cases get a second
  row against it (issue 18: within 1.2x).

The cases themselves are ``benchmarks/cases.py``'s, shared with ``gpu.py`` and ``scaling.py``.

Usage (from the repository root, venv active)::

    python benchmarks/run.py [--n 256] [--threads 1] [--module-n 32] [--anchor-n 32] [--rss-n 1024]
                             [--out benchmarks/results.json] [--profile auto|none|CASE]
                             [--skip module,grad,neurons,trace,anchors,ft,rss]

Writes the JSON report (atomically) and prints a table. ``--rss-child`` is internal: the peak-RSS
measurement runs in a fresh subprocess so that the parent's allocations do not count.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import pstats
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import make_report, run_groups  # noqa: E402
from harness import Case, Report, load_average, machine_info, peak_rss_gb, write_report  # noqa: E402

from bias_lens import load_model  # noqa: E402
from bias_lens.benchmarks import sample_prompts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=256, help="prompts for every case (issue 7: >= 256)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the whole run")
    ap.add_argument("--module-n", type=int, default=32, help="prompts for the module scan (its own floor)")
    ap.add_argument("--anchor-n", type=int, default=32, help="prompts the naive anchors are timed on (scaled to --n)")
    ap.add_argument("--rss-n", type=int, default=1024, help="prompts for the peak-RSS subprocess (0 skips it)")
    ap.add_argument("--repeat", type=int, default=2, help="best of R runs for each locate case")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json")
    ap.add_argument("--profile", default="auto", help="'auto' profiles the worst case vs its target, 'none', or a case name")
    ap.add_argument("--skip", default="", help="comma-separated groups to skip: module,grad,neurons,trace,anchors,ft,rss")
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.n < 32 or a.module_n < 1 or a.anchor_n < 1 or a.threads < 1:
        ap.error("--n must be >= 32 and --module-n, --anchor-n, --threads >= 1")
    return a


def vm_hwm_gb() -> float | None:
    """Peak RSS of this process image from /proc/self/status (VmHWM, KiB), or None off Linux.

    Unlike ``ru_maxrss`` it is not inherited: Linux folds the parent's high-water mark into the
    child's ``ru_maxrss`` at exec when the child was started with vfork/posix_spawn (what
    :mod:`subprocess` uses), so a child started from this big parent reports the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def rss_child(n: int, threads: int) -> None:
    """Peak RSS of locating over ``n`` prompts (layer scale, BMI, neuron attribution); prints JSON."""
    from bias_lens.locate.attribution import neuron_attribution
    from bias_lens.locate.layers import bmi, layer_scale

    torch.set_num_threads(threads)
    out: dict = {"n": n}

    def mark(stage: str) -> None:
        out[f"ru_maxrss_{stage}_gb"] = peak_rss_gb()
        hwm = vm_hwm_gb()
        out[f"vmhwm_{stage}_gb"] = None if hwm is None else round(hwm, 3)

    mark("start")
    lm = load_model("smollm2-135m")
    prompts = sample_prompts("genbiaseval", "train", n, seed=0)
    mark("after_load")
    layer_scale(lm, prompts)
    mark("after_layer")
    bmi(lm, prompts)
    mark("after_bmi")
    neuron_attribution(lm, prompts)
    mark("after_attribution")
    out["peak_rss_gb"] = out["vmhwm_after_attribution_gb"] or out["ru_maxrss_after_attribution_gb"]
    print(json.dumps(out))


def measure_rss(n: int, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", "--rss-n", str(n), "--threads", str(threads)]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"RSS subprocess failed (rc {res.returncode}): {res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["seconds"] = time.perf_counter() - t
    return out


def profile(fn, path: Path, top: int = 30) -> str:
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf).strip_dirs().sort_stats("cumulative")
    st.print_stats(top)
    buf.write("\n--- by own time ---\n")
    st.sort_stats("tottime").print_stats(top)
    path.write_text(buf.getvalue())
    return buf.getvalue()


def profile_worst(report: Report, cases: list[Case], which: str, out: Path) -> None:
    """cProfile the case worst against its target (``auto``) or the named one, next to ``out``."""
    by_name = {c.name: c for c in cases}
    worst = None
    if which == "auto":
        scored = [(r.ratio / r.target, r.name) for r in report.rows
                  if r.target and r.better == "lower" and r.name in by_name and r.ratio == r.ratio]
        worst = max(scored)[1] if scored else None
    elif which in by_name:
        worst = which
    if worst:
        path = out.with_name("profile_" + "".join(ch if ch.isalnum() else "_" for ch in worst) + ".txt")
        txt = profile(by_name[worst].fn, path)
        report.extra["profiled"] = {"case": worst, "file": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)}
        print(f"\nprofile of {worst} -> {path}\n" + "\n".join(txt.splitlines()[:45]))


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.rss_child:
        rss_child(a.rss_n, a.threads)
        return 0
    logging.basicConfig(level=logging.WARNING)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    torch.set_num_threads(a.threads)
    t_start = time.time()
    machine = machine_info()
    lm = load_model("smollm2-135m")
    prompts = sample_prompts("genbiaseval", "train", a.n, seed=0)
    torch.set_grad_enabled(False)
    report = make_report(lm, prompts, a.module_n, machine)
    print(f"floor forward x{a.n}: {report.floors['forward']:.3f}s", flush=True)
    cases = run_groups(report, lm, prompts, repeat=a.repeat, module_n=a.module_n, anchor_n=a.anchor_n, skip=skip)

    # ---- peak RSS over 1,024 prompts in a fresh subprocess
    if "rss" not in skip and a.rss_n:
        rss = measure_rss(a.rss_n, a.threads)
        report.extra["rss"] = rss
        report.add(f"peak RSS GB, locate x{a.rss_n} (subprocess)", rss["seconds"], rss["peak_rss_gb"], "GB (absolute)", 2.5,
                   note=f"VmHWM; after model load {rss['vmhwm_after_load_gb']} GB, after layer+bmi "
                        f"{rss['vmhwm_after_bmi_gb']} GB; layer_scale + bmi + neuron_attribution")
    machine["load_average_end"] = load_average()
    report.extra["wall_seconds"] = time.time() - t_start
    if a.profile != "none":
        profile_worst(report, cases, a.profile, a.out)
    print()
    print(f"machine: {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs, torch threads {a.threads}, "
          f"load avg start {machine['load_average_start']} end {machine['load_average_end']}")
    print("floors: " + ", ".join(f"{k} {v:.3f}s" for k, v in report.floors.items()))
    print(report.table())
    write_report(report, a.out)
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
