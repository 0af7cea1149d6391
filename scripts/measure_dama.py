"""Measure the DAMA baseline on SmolLM2 (docs/dama.md): dev sweep, then test before/after.

    nice -n 10 python -u scripts/measure_dama.py --out runs/dama_smollm2.json

The mixed update's deltas are optimised once (they do not depend on null_dim or the layers) and
reused by every configuration; configurations are chosen on the DAMA dev split only.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from bias_lens import load_model
from bias_lens.benchmarks import evaluate, load_split
from bias_lens.edit.dama import DamaConfig, dama_edit
from bias_lens.io import atomic_write_text

KEYS = {"dama": ("a_s", "a_f", "b", "r2", "a_s_renorm", "a_f_renorm"), "genbiaseval": ("afgb", "afgb_renorm", "mass"),
        "retention": ("ppl", "perplexity")}


def _m(r, suite):
    return {k: r.metrics[k] for k in r.metrics if k in KEYS[suite] or suite == "retention"}


def test_metrics(lm, limit_ret):
    return {"dama": _m(evaluate(lm, "dama", "test"), "dama"),
            "genbiaseval": _m(evaluate(lm, "genbiaseval", "test"), "genbiaseval"),
            "retention": _m(evaluate(lm, "retention", "test", limit=limit_ret), "retention")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/dama_smollm2.json")
    ap.add_argument("--max-requests", type=int, default=96)
    ap.add_argument("--before", default=None, help="reuse the 'before' block of an earlier output JSON")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sweep", default="18:10,54:10,90:10,18:5", help="null_dim:n_layers,... (first = default)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    lm = load_model("smollm2-135m")
    train = load_split("dama", "train")
    res: dict = {"args": vars(a), "n_layers_model": lm.n_layers, "d_model": lm.d_model}
    save = lambda: atomic_write_text(a.out, json.dumps(res, indent=1))  # noqa: E731
    t = time.time()
    if a.before:
        res["before"] = json.load(open(a.before))["before"]
    else:
        res["before"] = test_metrics(lm, 200)
        res["before"]["dev"] = _m(evaluate(lm, "dama", "dev"), "dama")
        res["t_before_s"] = time.time() - t
    save()
    grid = [tuple(int(x) for x in c.split(":")) for c in a.sweep.split(",")]
    deltas, res["dev"] = None, {}
    for i, (nd, nl) in enumerate(grid):
        cfg = DamaConfig(null_dim=nd, n_layers=nl, update="mixed", max_requests=a.max_requests, steps=a.steps)
        t = time.time()
        e = dama_edit(lm, train, cfg, deltas=deltas)
        deltas = e.deltas
        with e.applied(lm.hf):
            res["dev"][cfg.variant] = {**_m(evaluate(lm, "dama", "dev"), "dama"), "layers": e.meta["layers"],
                                       "t_edit_s": time.time() - t}
            if i == 0:
                res["default"] = {"variant": cfg.variant, "layers": e.meta["layers"], **test_metrics(lm, 200)}
        save()
    best = min(res["dev"], key=lambda v: abs(res["dev"][v]["a_s"]))
    res["best_on_dev"] = best
    if best != res["default"]["variant"]:
        nd, nl = (int(best.split("/nd")[1].split("/")[0]), int(best.split("/l")[1].split("/")[0]))
        e = dama_edit(lm, train, DamaConfig(null_dim=nd, n_layers=nl, update="mixed", max_requests=a.max_requests,
                                            steps=a.steps), deltas=deltas)
        with e.applied(lm.hf):
            res["best"] = {"variant": best, "layers": e.meta["layers"], **test_metrics(lm, 200)}
    save()


if __name__ == "__main__":
    main()
