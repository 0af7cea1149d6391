"""Dev-only sweep of the closed-form equalising solve (``--method msme``'s default solver) on SmolLM2.

    python scripts/closed_form_sweep.py --out docs/closed_form_sweep.jsonl

Trains as ``bias-lens edit`` does by default: the whole GenBiasEval train split (1,026 prompts) and
GenHintEval train (342, the hinted prompts whose log-odds are kept), C from the first 48 sentences of
the edits' retention pool. Every row is scored on dev data only: GenBiasEval dev (513) AFGB-r and
pronoun mass, GenHintEval dev (171) UB, and perplexity on the edits' retention pool sentences 48..255
(not the 48 that C is computed on, and not the retention suite's test sentences). Rows: the located
module (``L29.mlp.down``, the whole matrix) over ridge x re-linearisations, and 4,096 of its entries
over locator (``train`` / ``retention``: share of the whole-matrix solution's effect on its constraints /
on the retention tokens, ``equalise.solution_entries``; ``msme``: MSME Eq. 5) x penalty
(``diag`` / ``block``) x ridge x re-linearisations. Later linearisations replay block 29's input
(:mod:`bias_lens.prefix_cache`), so each costs a fraction of the first.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from bias_lens import load_model
from bias_lens.benchmarks import load_split
from bias_lens.benchmarks.external import retention_texts
from bias_lens.benchmarks.metrics import afgb_t, mass_t, ub_terms_t
from bias_lens.edit import equalise as E
from bias_lens.edit.masks import mask_from_labels
from bias_lens.edit.measure import dev_probs, retention_perplexity
from bias_lens.locate.gradients import neuron_scale
from bias_lens.prefix_cache import PrefixCache, record, replay

MODULE = "L29.mlp.down"


def dev_scores(lm, dev: list[str], hint: list[dict], texts: list[str]) -> dict[str, float]:
    """AFGB-r and mass on GenBiasEval dev, UB on GenHintEval dev, perplexity on pool texts."""
    p = dev_probs(lm, dev)
    ph = dev_probs(lm, [s["prompt"] for s in hint])
    ub = ub_terms_t(ph, torch.tensor([s["F"] for s in hint], dtype=ph.dtype)).mean()
    return {"afgb_r": float(afgb_t(p, renorm=True)), "mass": float(mass_t(p)), "ub": float(ub),
            "ppl": retention_perplexity(lm, texts)}


def sweep(lm, label: str, mask, train, hint, ridges, penalties, n_iter: int, score, out) -> None:
    """One linearised problem, solved for every (penalty, ridge) and up to ``n_iter`` re-linearisations."""
    cfg = E.EqualiseConfig()
    pb = E._problem(lm, mask, train, hint, None, cfg)
    c = pb.moment + cfg.cov_reg * float(pb.moment.diagonal().mean()) * torch.eye(len(pb.moment), dtype=pb.moment.dtype)
    c_inv = torch.linalg.inv(c) if pb.dense else None
    prefix = PrefixCache((29,))
    lin = lambda: [E.linearise(lm, pb.module, p, pb.tid, 32) for p in pb.sets]  # noqa: E731
    with record(lm, prefix):
        ref = lin()
    base = pb.base()
    for pen in penalties:
        for ridge in ridges:
            delta, t0 = torch.zeros_like(base), time.time()
            for it in range(n_iter):
                cur = ref
                if it:
                    with pb.edit(lm, base + delta).applied(lm.hf), replay(lm, prefix, 29):
                        cur = lin()
                u, k, t = E._rows(cur, ref, cfg)
                delta = delta + (E.solve_dense(u, k, t, c_inv, ridge)[pb.rows, pb.cols] if pb.dense
                                 else E.solve_entries(u, k, t, pb.rows, pb.cols, c, ridge, pen))
                with pb.edit(lm, base + delta).applied(lm.hf):
                    rec = {"row": label, "n_entries": len(base), "penalty": pen if not pb.dense else None,
                           "ridge": ridge, "n_iter": it + 1, "seconds": round(time.time() - t0, 1), **score()}
                print(json.dumps(rec), flush=True)
                out.write(json.dumps(rec) + "\n")
                out.flush()


def table(path: str) -> str:
    """The sweep as Markdown (first record of each setting; ``*`` = within half of every guard's margin:
    perplexity <= +2.5%, mass >= 0.95 x Org, UB >= Org - 0.025, the rule that chose the defaults)."""
    recs = [json.loads(line) for line in open(path)]
    org = next(r for r in recs if r["row"] == "Org")
    out = ["| row | penalty | ridge | n_iter | dev AFGB-r | cut | mass | UB | PPL (pool) | PPL change | within |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
           f"| Org | – | – | – | {org['afgb_r']:.3f} | – | {org['mass']:.3f} | {org['ub']:.3f} | {org['ppl']:.2f} | – | |"]
    seen = set()
    for r in recs:
        key = (r["row"], r.get("penalty"), r.get("ridge"), r.get("n_iter"))
        if r["row"] == "Org" or key in seen:
            continue
        seen.add(key)
        ok = r["ppl"] <= 1.025 * org["ppl"] and r["mass"] >= 0.95 * org["mass"] and r["ub"] >= org["ub"] - 0.025
        out.append(f"| {r['row']} | {r.get('penalty') or '–'} | {r['ridge']:g} | {r['n_iter']} | {r['afgb_r']:.3f} | "
                   f"{1 - r['afgb_r'] / org['afgb_r']:.0%} | {r['mass']:.3f} | {r['ub']:.3f} | {r['ppl']:.2f} | "
                   f"{r['ppl'] / org['ppl'] - 1:+.1%} | {'*' if ok else ''} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/closed_form_sweep.jsonl")
    ap.add_argument("--rows", default="module,train,retention,msme")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--entry-ridges", default="0.3,1,3,10")
    ap.add_argument("--penalties", default="diag,block")
    ap.add_argument("--table", action="store_true", help="print --out as a Markdown table and exit")
    args = ap.parse_args()
    if args.table:
        return print(table(args.out))
    torch.set_num_threads(1)
    lm = load_model("smollm2-135m")
    train, hint = load_split("genbiaseval", "train"), load_split("genhinteval", "train")
    dev = [s["prompt"] for s in load_split("genbiaseval", "dev")]
    hdev, texts = load_split("genhinteval", "dev"), retention_texts(256)[48:]
    score = lambda: dev_scores(lm, dev, hdev, texts)  # noqa: E731
    with open(args.out, "a") as out:
        org = {"row": "Org", **score()}
        print(json.dumps(org), flush=True)
        out.write(json.dumps(org) + "\n")
        rows = args.rows.split(",")
        if "module" in rows:
            sweep(lm, "module", mask_from_labels(lm.hf, [MODULE]), train, hint, (0.003, 0.01, 0.03, 0.1), ("dense",), 2,
                  score, out)
        ridges = tuple(float(x) for x in args.entry_ridges.split(","))
        for loc in ("train", "retention", "msme"):
            if loc not in rows:
                continue
            labels = (neuron_scale(lm, [s["prompt"] for s in random.Random(0).sample(train, 256)], MODULE).top_labels(args.k)
                      if loc == "msme" else E.solution_entries(lm, MODULE, train, k=args.k, hint=hint, share=loc).labels)
            sweep(lm, f"entries:{loc}", mask_from_labels(lm.hf, labels), train, hint, ridges,
                  tuple(args.penalties.split(",")), 3, score, out)


if __name__ == "__main__":
    main()
