"""Follow-up measurements behind the notes on misses in docs/performance.md (run on demand).

    python benchmarks/checks.py long [--n 32]     # layer_scale / floor on long GenBiasPro-CG prompts
    python benchmarks/checks.py rss  [--n 1024]   # peak RSS (VmHWM) of neuron_attribution alone

Each prints one JSON line. ``rss`` runs the measurement in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from anchors import bare_forward  # noqa: E402
from harness import time_case  # noqa: E402
from run import vm_hwm_gb  # noqa: E402

from bias_lens import load_model  # noqa: E402
from bias_lens.benchmarks import sample_prompts  # noqa: E402


def long_prompts(n: int) -> dict:
    from bias_lens.locate.layers import layer_scale

    lm = load_model("smollm2-135m")
    prompts = sample_prompts("genbiaspro-cg", "train", n, seed=0)
    toks = [len(lm.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    with torch.no_grad():
        bare_forward(lm, prompts)
        floor = time_case(lambda: bare_forward(lm, prompts), 3)
        t = time_case(lambda: layer_scale(lm, prompts), 2)
    return {"suite": "genbiaspro-cg", "n": n, "mean_tokens": sum(toks) / n, "floor_s": floor,
            "layer_scale_s": t, "ratio": t / floor}


def rss_one(n: int) -> dict:
    from bias_lens.locate.attribution import neuron_attribution

    lm = load_model("smollm2-135m")
    prompts = sample_prompts("genbiaseval", "train", n, seed=0)
    after_load = vm_hwm_gb()
    neuron_attribution(lm, prompts)
    return {"n": n, "vmhwm_after_load_gb": after_load, "vmhwm_peak_gb": vm_hwm_gb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["long", "rss", "rss-one"])
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.what == "long":
        print(json.dumps(long_prompts(a.n or 32)))
    elif a.what == "rss-one":
        print(json.dumps(rss_one(a.n or 1024)))
    else:  # in a fresh subprocess, so the high-water mark is attribution's own
        cmd = [sys.executable, __file__, "rss-one", "--n", str(a.n or 1024), "--threads", str(a.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        print(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
