"""The general-neuron experiment on SmolLM2 (docs/general_neurons.md; raw numbers in docs/general_neurons.json).

Usage: ``python scripts/measure_general_neurons.py [--out docs/general_neurons.json] [--seeds 3]``
(one thread, ~10 minutes on a shared 2-core CPU).

1. General neurons: :func:`~bias_lens.locate.general_neurons.position_stats` with the start token
   prepended on 64 GenBiasEval train prompts + 64 arithmetic *train* prompts (no evaluated item),
   :func:`~bias_lens.locate.general_neurons.detect_general` (outsized at position 0 in >= 90% of
   prompts), ranked by their write at the start position (:func:`~bias_lens.locate.general_neurons.rank_general`).
2. Arithmetic (test, first 150) and MMLU (val, first row of each of the 57 subjects, 0-shot)
   before and after masking the top 2 (:func:`~bias_lens.locate.general_neurons.capability_masking`,
   start token prepended), and the same for the top 2 general neurons of the shallow half of the
   layers (the paper's general neurons are shallow and feed deeper ones).
3. Controls: per pair and seed, one random neuron from each masked neuron's layer (never a detected
   general neuron), same measurement.
4. The paper's Table 3: deeper neurons' coefficient changes on the 150 arithmetic prompts
   (:func:`~bias_lens.locate.general_neurons.coefficient_changes`), for each pair and its first control.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import torch

from bias_lens import load_model
from bias_lens.arch import parse_neuron_name
from bias_lens.benchmarks import capability_data as cd
from bias_lens.locate.general_neurons import (
    capability_accuracy, capability_masking, coefficient_changes, detect_general, position_stats, rank_general,
)
from bias_lens.locate.prompts import resolve_prompts

log = logging.getLogger("measure_general_neurons")
LIMITS = dict(arithmetic_split="test", arithmetic_limit=150, mmlu_split="val", mmlu_limit_per_subject=1)


def random_control(pair: list[str], exclude: set[str], d_mlp: int, seed: int) -> list[str]:
    """One random neuron from each of ``pair``'s layers, never one in ``exclude``."""
    rnd = random.Random(seed)
    out = []
    for lab in pair:
        layer, _ = parse_neuron_name(lab)
        while (pick := f"L{layer}N{rnd.randrange(d_mlp)}") in exclude or pick in out:
            pass
        out.append(pick)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/general_neurons.json")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    t0 = time.time()
    lm = load_model("smollm2-135m")
    det = resolve_prompts("genbiaseval", "train", 64) + [r["prompt"] for r in cd.arithmetic_splits()["train"][:64]]
    stats = position_stats(lm, det, batch_size=16)
    general = rank_general(lm, detect_general(stats, min_frac=0.9, model=lm.name), det)
    shallow = [lab for lab in general.top_labels(len(general)) if parse_neuron_name(lab)[0] < lm.n_layers // 2]
    pairs = {"top2": general.top_labels(2), "top2_shallow": shallow[:2]}
    log.info("%d general neurons; pairs %s (%.0f s)", len(general), pairs, time.time() - t0)
    top = [{"label": lab, "start_write": s, "outsized_frac": float(stats.outsized_frac[parse_neuron_name(lab)]),
            "argmax0_frac": float(stats.argmax0_frac[parse_neuron_name(lab)])} for lab, s in general.top(10)]
    per_layer = torch.bincount(torch.tensor([parse_neuron_name(lab)[0] for lab in general.labels]), minlength=lm.n_layers)
    base = capability_accuracy(lm, start_token=True, **LIMITS)
    raw = capability_accuracy(lm, start_token=False, **LIMITS)[0]
    log.info("base with start %s, without %s (%.0f s)", base[0], raw, time.time() - t0)
    arith = [r["prompt"] for r in cd.arithmetic_splits()["test"][:150]]
    runs = {}
    for name, pair in pairs.items():
        controls = [random_control(pair, set(general.labels), lm.d_mlp, seed) for seed in range(args.seeds)]
        runs[name] = {
            "masked": capability_masking(lm, pair, start_token=True, before=base, **LIMITS).to_dict(),
            "controls": [capability_masking(lm, c, start_token=True, before=base, **LIMITS).to_dict() for c in controls],
            "coefficients": coefficient_changes(lm, arith, pair, top_k=10).to_dict(),
            "control_coefficients": coefficient_changes(lm, arith, controls[0], top_k=10).to_dict(),
        }
        log.info("%s: %s; controls %s (%.0f s)", name, runs[name]["masked"]["after"],
                 [c["after"] for c in runs[name]["controls"]], time.time() - t0)
    out = {"model": lm.name, "detection": {"n_prompts": len(det), "start_token": stats.start_token, "min_frac": 0.9,
                                           "z": stats.z, "n_eligible": stats.n_eligible},
           "n_general": len(general), "general_per_layer": per_layer.tolist(), "top_general": top, "limits": LIMITS,
           "base_start_token": base[0], "base_raw_prompts": raw, "n_items": base[1], "runs": runs,
           "seconds": round(time.time() - t0)}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    log.info("wrote %s (%.0f s)", args.out, time.time() - t0)


if __name__ == "__main__":
    main()
