"""Peak RSS of each locate method alone, against the prompt count (issue 18 item 2, the memory half).

Every (method, N) runs in a fresh subprocess that loads a random-initialised Llama of ``--size``
(``benchmarks/models.py``), builds N prompts (``scaling.prompts_for``), runs the method once and
reports VmRSS after loading, then resets the high-water mark (``/proc/self/clear_refs``) and reads
VmHWM (per process image, see ``run.vm_hwm_gb``) after the call, so each row is that method's own
peak (``peak - after load`` = what the call added on top of the loaded model). What must hold (issue 18): the peak grows with the
model and the kept activations only, not with N beyond one batch.

    python benchmarks/locate_rss.py --size 135m --n 256,1024,4096 [--dtype float32] [--label after]
                                    [--methods layer_scale,bmi,neuron_attribution,...] [--out F]

Methods: ``layer_scale``, ``bmi``, ``layer_scale_and_bmi``, ``neuron_attribution`` (streamed,
the default call), ``neuron_attribution_cache`` (the same over ``collect_last``'s full cache, the
path kept for callers that pass one), ``head_attribution``. Appends ``{"label", "rows": [...]}`` to
``--out`` (default ``benchmarks/locate_rss.json``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import load_average  # noqa: E402
from models import random_llama  # noqa: E402
from run import vm_hwm_gb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("layer_scale", "bmi", "layer_scale_and_bmi", "neuron_attribution", "neuron_attribution_cache",
           "head_attribution")


def call(method: str, lm, prompts: list[str]) -> object:
    """Run ``method`` once on ``prompts``."""
    from bias_lens.locate import attribution as A
    from bias_lens.locate import layers as Ly

    if method == "neuron_attribution_cache":
        return A.neuron_attribution(lm, prompts, cache=A.collect_last(lm, prompts))
    fn = {"layer_scale": Ly.layer_scale, "bmi": Ly.bmi, "layer_scale_and_bmi": Ly.layer_scale_and_bmi,
          "neuron_attribution": A.neuron_attribution, "head_attribution": A.head_attribution}[method]
    return fn(lm, prompts)


def child(size: str, n: int, method: str, dtype: str, threads: int) -> dict:
    """One (method, N) in this fresh process: VmHWM after loading and after the call."""
    from scaling import prompts_for

    from bias_lens.loading import resolve_dtype

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    lm = random_llama(size, dtype=resolve_dtype(dtype))
    prompts = prompts_for(n)
    gc.collect()
    load_hwm, load_rss, reset = vm_hwm_gb(), vm_rss_gb(), reset_hwm()
    t = time.perf_counter()
    call(method, lm, prompts)
    return {"size": size, "dtype": dtype, "n": n, "method": method, "seconds": time.perf_counter() - t,
            "vmhwm_after_load_gb": load_hwm, "vmrss_after_load_gb": load_rss, "hwm_reset_after_load": reset,
            "vmhwm_peak_gb": vm_hwm_gb(), "load_average": load_average()}


def vm_rss_gb() -> float | None:
    """Current RSS of this process (VmRSS, /proc/self/status), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs), so the peak
    read after the call is the call's own, not model construction's transient; False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="135m")
    ap.add_argument("--n", default="256,1024,4096")
    ap.add_argument("--methods", default=",".join(m for m in METHODS if m != "layer_scale_and_bmi"))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--label", default="")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "locate_rss.json")
    ap.add_argument("--child", nargs=3, metavar=("SIZE", "N", "METHOD"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.child[2], a.dtype, a.threads)))
        return 0
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    rows = []
    for n in [int(x) for x in a.n.split(",") if x.strip()]:
        for m in methods:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", a.size, str(n), m, "--dtype", a.dtype,
                   "--threads", str(a.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False, env=os.environ.copy())
            if res.returncode != 0:
                raise RuntimeError(f"{m} x{n} failed (rc {res.returncode}): {res.stderr[-2000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{m} x{n}: peak {r['vmhwm_peak_gb']:.2f} GB (RSS after load {r['vmrss_after_load_gb']:.2f}), "
                  f"{r['seconds']:.0f}s, load {r['load_average']}", flush=True)
    old = json.loads(a.out.read_text()) if a.out.exists() else {"runs": []}
    old["runs"].append({"label": a.label, "rows": rows})
    tmp = a.out.with_name(f".{a.out.name}.tmp")
    tmp.write_text(json.dumps(old, indent=2))
    tmp.replace(a.out)
    print("| method | N | peak RSS GB | RSS after load GB | peak - load GB | s |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['n']} | {r['vmhwm_peak_gb']:.2f} | {r['vmrss_after_load_gb']:.2f} | "
              f"{r['vmhwm_peak_gb'] - r['vmrss_after_load_gb']:.2f} | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
