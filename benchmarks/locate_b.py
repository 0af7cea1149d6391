"""SmolLM2 run of locate methods 6-9 (attribution, general neurons, causal, circuit) + timing.

Usage: python benchmarks/locate_b.py OUT_DIR   (writes OUT_DIR/locate_b.json and HTML figures)
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

from bias_lens import load_model
from bias_lens.locate.attribution import collect_last, head_attribution, neuron_attribution, target_importance
from bias_lens.locate.causal import causal_selection
from bias_lens.locate.circuit import trace_circuit
from bias_lens.locate.general_neurons import detect_general, filter_general, masking_effect, position_stats
from bias_lens.locate.query_neurons import query_neurons
from bias_lens.scoring import iter_batches


def best_of(fn, n=2):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return min(ts), out


def main(out_dir: str) -> None:
    logging.basicConfig(level=logging.INFO)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    from bias_lens.benchmarks.datasets import sample_prompts

    lm = load_model("smollm2-135m")
    prompts = sample_prompts("genbiaseval", "train", 200, 0)
    dev = sample_prompts("genbiaseval", "train", 264, 1)[-64:]
    R = {"n_prompts": len(prompts)}

    def bare():
        for b in iter_batches(lm.tokenizer, prompts, 32):
            lm.hf(**b.model_inputs())

    def attr():
        c = collect_last(lm, prompts)
        return c, neuron_attribution(lm, prompts, cache=c), head_attribution(lm, prompts, cache=c)

    bare()
    t_bare, _ = best_of(bare)
    t_attr, (cache, nres, hres) = best_of(attr)
    R["timing"] = {"bare_forward_s": t_bare, "attribution_all_neurons_and_heads_s": t_attr, "ratio": t_attr / t_bare}
    signed = nres.extras["signed"]
    R["top_neurons"] = [(lab, float(signed[nres.labels.index(lab)])) for lab in nres.top_labels(15)]
    R["top_heads"] = [(lab, float(hres.extras["signed"][hres.labels.index(lab)])) for lab in hres.top_labels(10)]
    rec = neuron_attribution(lm, prompts, cache=cache, norm="recompute")
    R["top_neurons_recompute"] = rec.top_labels(15)
    imp = target_importance(lm, cache, nres.top_labels(5), "he,she").mean(0)
    R["target_importance_top5"] = {lab: imp[i].tolist() for i, lab in enumerate(nres.top_labels(5))}
    nres.save(out / "attribution_neurons.json")
    hres.save(out / "attribution_heads.json")

    stats = position_stats(lm, prompts)
    filt = filter_general(nres, stats)
    top50 = nres.top_labels(50)
    R["general_in_top50"] = [lab for lab in top50 if lab in set(filt.extras["general_excluded"])]
    R["top_neurons_filtered"] = filt.top_labels(15)
    det = detect_general(stats)
    R["detected_general"] = det.top(20)
    R["n_detected_general"] = len(det.labels)
    general = R["general_in_top50"] or det.top_labels(2)
    R["masking_effect"] = masking_effect(lm, general, filt.top_labels(2), n=2)
    if det.labels:
        R["masking_effect_detected"] = masking_effect(lm, det.top_labels(2), filt.top_labels(2), n=2)

    t = time.perf_counter()
    cres = causal_selection(lm, filt.top_labels(50), dev, k=10)
    R["causal_independent"] = {"selected": cres.extras["selected"], "afgb_base": cres.extras["afgb_base"],
                               "ppl_base": cres.extras["ppl_base"], "top": cres.top(10), "seconds": time.perf_counter() - t}
    t = time.perf_counter()
    gres = causal_selection(lm, filt.top_labels(20), dev, k=5, mode="greedy")
    R["causal_greedy"] = {"selected": gres.labels, "afgb": gres.extras["afgb"], "ppl": gres.extras["ppl"],
                          "seconds": time.perf_counter() - t}
    q = query_neurons(lm, cache, filt.top_labels(10))
    R["query_neurons_top10"] = [(lab, float(q.extras["signed"][q.labels.index(lab)])) for lab in q.top_labels(10)]
    g = trace_circuit(lm, filt.top_labels(1)[0], cache=cache, top_k=4, depth=2)
    R["circuit"] = g.to_dict()
    (out / "circuit.json").write_text(g.to_json())
    from bias_lens.plot.attribution import head_heatmap, neuron_heatmap
    from bias_lens.plot.circuit import circuit_figure

    neuron_heatmap(nres).write_html(out / "neuron_heatmap.html", include_plotlyjs="cdn")
    head_heatmap(hres).write_html(out / "head_heatmap.html", include_plotlyjs="cdn")
    circuit_figure(g).write_html(out / "circuit.html", include_plotlyjs="cdn")
    (out / "locate_b.json").write_text(json.dumps(R, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "locate_b_out")
