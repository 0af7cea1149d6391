"""Where the exact layer score's time goes, per model size and dtype (issue 18 item 2's profile).

The layer score = one residual pass (body + hooks keeping last-token residuals) + the logit lens
over (n_layers + 1) x N rows. Its FLOP bound prices the lens's FLOPs at the forward's FLOP rate;
for bf16/fp16 models the lens runs in float32 on purpose (``layers.lens_dtype``: a bf16 logit has
~3 significant digits), so on a CPU whose bf16 matmuls run faster than its float32 ones the lens
costs more than its FLOPs at the forward's rate. This script times, in one process:

* ``forward``: the bare forward (the benchmark floor);
* ``residual_pass``: the pass alone, residuals kept (``keep_last=True``, no lens);
* ``lens``: ``lens_probs`` over the kept stack (the library's lens, float32 for half precision);
* ``lens_in_model_dtype``: the same unembedding matmuls in the model's dtype (a what-if, not
  used by the library: the cost the upcast adds);
* ``matmul GFLOP/s`` of one lens chunk and one body MLP matmul in float32 and in the model dtype.

    python benchmarks/lens_split.py --size 1b --dtype bfloat16 --n 64 [--threads 1]

Prints one JSON line: seconds, ratios to the forward, the FLOP bound and the mixed-rate bound
``(body + lens FLOPs x penalty) / forward``, penalty = the lens chunk's matmul rate in the model
dtype / in the lens dtype (1 for float32 models).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from anchors import bare_forward  # noqa: E402
from harness import flop_counts, load_average, time_case  # noqa: E402
from models import random_llama  # noqa: E402
from scaling import prompts_for  # noqa: E402


def gflops(m: int, k: int, n: int, dtype: torch.dtype, repeat: int = 3) -> float:
    """GFLOP/s of ``[m, k] @ [k, n]`` in ``dtype`` (best of ``repeat``, into a preallocated output)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b.T, out=out)
    best = min(time_case(lambda: torch.mm(a, b.T, out=out), 1) for _ in range(repeat))
    return 2 * m * k * n / best / 1e9


def split(size: str, dtype: str, n: int) -> dict:
    from bias_lens.loading import resolve_dtype
    from bias_lens.locate.layers import LENS_LOGIT_BUDGET, lens_dtype, lens_probs, residual_pass

    dt = resolve_dtype(dtype)
    lm = random_llama(size, dtype=dt)
    prompts = prompts_for(n)
    ids = [lm.tokenizer(w, add_special_tokens=False).input_ids[0] for w in (" he", " she")]
    bare_forward(lm, prompts[:8])
    out: dict = {"size": size, "dtype": dtype, "n": n, "load_average_start": load_average()}
    rp = residual_pass(lm, prompts)
    w = lm.unembed.weight.detach()

    def lens_model_dtype() -> None:  # the unembedding matmuls in the model's dtype (what-if)
        rows = rp.last.reshape(-1, lm.d_model)
        chunk = max(1, LENS_LOGIT_BUDGET // w.shape[0])
        buf = torch.empty(min(chunk, rows.shape[0]), w.shape[0], dtype=w.dtype)
        for s in range(0, rows.shape[0], chunk):
            torch.mm(lm.final_norm(rows[s : s + chunk]), w.T, out=buf[: rows[s : s + chunk].shape[0]])

    t = {
        "forward": time_case(lambda: bare_forward(lm, prompts), 2),
        "residual_pass": time_case(lambda: residual_pass(lm, prompts), 2),
        "lens": time_case(lambda: lens_probs(lm, rp.last, ids, final=rp.last[-1]), 2),
        "lens_in_model_dtype": time_case(lens_model_dtype, 2),
    }
    fc = flop_counts(lm, prompts)
    chunk = min(max(1, LENS_LOGIT_BUDGET // w.shape[0]), (lm.n_layers + 1) * 32)
    rates = {
        "lens_chunk": {str(d).split(".")[-1]: gflops(chunk, lm.d_model, w.shape[0], d)
                       for d in {lens_dtype(dt), dt}},
        "body_mlp": {str(d).split(".")[-1]: gflops(32 * 9, lm.d_model, lm.d_mlp, d) for d in {torch.float32, dt}},
    }
    lens_flops = fc["layer_score"] - fc["body"]
    lc = rates["lens_chunk"]
    slow = lc[str(dt).split(".")[-1]] / lc[str(lens_dtype(dt)).split(".")[-1]]  # model-dtype rate / lens rate
    out |= {"seconds": t, "ratios_to_forward": {k: v / t["forward"] for k, v in t.items()}, "flops": fc,
            "gflops_per_s": rates | {"forward_effective": fc["forward"] / t["forward"] / 1e9,
                                     "lens_effective": lens_flops / t["lens"] / 1e9},
            "flop_bound_ratio": fc["bound_ratio"], "lens_rate_penalty": slow,
            # the FLOP bound with the lens's FLOPs priced at the lens dtype's matmul rate (microbenchmark)
            "mixed_rate_bound_ratio": (fc["body"] + lens_flops * slow) / fc["forward"],
            "load_average_end": load_average()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    print(json.dumps(split(a.size, a.dtype, a.n)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
