"""Time bias tracing on SmolLM2 (docs/tracing.md): per item, the trace vs a bare forward of its two sentences.

Usage: python scripts/measure_tracing.py COMPONENTS N_NOISE POSITIONS OUT.json [LIMIT]
e.g.   nice -n 10 python scripts/measure_tracing.py resid 1 roles runs/trace_resid.json 20
OUT.json is rewritten (atomically) after every item, so a cut-short run keeps what it measured.
"""

import json
import sys
import time

import torch

from bias_lens import load_model
from bias_lens.io import atomic_write_text
from bias_lens.locate.tracing import bias_trace
from bias_lens.locate.tracing_data import load_tracing_items, prepare_item

comps, n_noise, positions, out = tuple(sys.argv[1].split(",")), int(sys.argv[2]), sys.argv[3], sys.argv[4]
limit = int(sys.argv[5]) if len(sys.argv) > 5 else 20
lm = load_model("smollm2-135m")
raw = load_tracing_items("gender", limit=limit)
items = [p for p in (prepare_item(lm.tokenizer, it) for it in raw) if p is not None]
log = {"n_raw": len(raw), "n_items": len(items), "components": comps, "n_noise": n_noise, "positions": positions,
       "threads": torch.get_num_threads(), "items": []}
with torch.no_grad():  # warm-up
    lm.hf(input_ids=torch.tensor([items[0].anti_ids, items[0].stereo_ids]))
results = []
for it in items:
    ids = torch.tensor([it.anti_ids, it.stereo_ids])
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(3):
            lm.hf(input_ids=ids)
    bare = (time.perf_counter() - t0) / 3
    t0 = time.perf_counter()
    r = bias_trace(lm, [it], components=comps, n_noise=n_noise, positions=positions, batch_size=64)
    dt = time.perf_counter() - t0
    results.append(r)
    log["noise_std"] = r.noise_std
    log["items"].append({"id": it.id, "n_tokens": it.n_tokens, "trace_s": dt, "bare_forward_s": bare,
                         "clean_gap": r.items[0].clean_gap, "corrupted_gap": r.items[0].corrupted_gap})
    merged = results[0]
    merged.items = [x.items[0] for x in results]
    atomic_write_text(out, json.dumps({"log": log, "result": merged.to_dict()}))
    print(it.id, it.n_tokens, round(dt, 1), round(bare, 3), flush=True)
