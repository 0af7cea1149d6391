"""Reproduce the edit table of docs/edit.md on SmolLM2 + GenBiasEval (seeds fixed, subsampled).

    python scripts/edit_sweep.py --rows org,pb,module,neuron --out-jsonl /tmp/edit_rows.jsonl

Every row is :func:`bias_lens.edit.pipeline.run_edit` with the plan below (train: 128 seeded
samples, dev: 64 for early stopping, test: a fixed-seed ``--limit`` (200) subset, UB: 100
GenHintEval samples, retention: 48 sentences);
the unedited metrics are measured once and reused. Layer/module/row/neuron scales use the
scale locators of ``bias_lens.locate`` when they exist, otherwise the first-order gradient
locator below (|grad * weight| of the msme_align loss summed per block / module / row, and |grad|
per entry for the neuron scale, restricted to ``mlp.down``). The module scale uses MSME's module
``L29.mlp.down`` unless ``--module-json`` gives a saved ``module_scale`` result. Each finished row is appended to
``--out-jsonl`` so partial sweeps survive; the markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import time

import torch

from bias_lens.edit.pipeline import LOCATORS, EditPlan, run_edit, split_samples
from bias_lens.locate.result import LocateResult

COMMON = dict(n_samples=128, dev_limit=64, limit=200, ub_limit=100, retention_limit=48, seed=0)
#: Module picked without the (slow on 2 CPU cores) zero-ablation scan: MSME's module, the last FFN
#: down projection; pass a saved ``module_scale`` result with --module-json to use the scan.
MODULE = "L29.mlp.down"
ROWS: dict[str, dict] = {
    # baselines
    "fpft": dict(method="fpft", loss="msme_literal", lr=1e-5, epochs=1, eval_every=2, patience=4),
    "pb": dict(method="prompt"),
    # masked fine-tuning at each scale (msme_literal: see docs/edit.md for why not msme_align)
    "layer": dict(method="msme", scale="layer", k=1, loss="msme_literal", lr=1e-5, epochs=2, eval_every=2, patience=4),
    "module": dict(method="msme", scale="module", k=1, loss="msme_literal", lr=1e-4, epochs=2, eval_every=1, patience=8),
    "module_align": dict(method="msme", scale="module", k=1, loss="msme_align", lr=1e-4, epochs=2),
    "module_lftf": dict(method="lftf", scale="module", k=1, lr=1e-4, epochs=2, eval_every=1, patience=8),
    "module_gap": dict(method="msme", scale="module", k=1, loss="gap", lr=1e-4, epochs=2, eval_every=1, patience=8),
    "row": dict(method="msme", scale="row", k=4, loss="msme_literal", lr=1e-3, epochs=2, eval_every=2, patience=4),
    "neuron": dict(method="msme", scale="neuron", k=4096, loss="msme_literal", lr=1e-3, epochs=2, eval_every=1,
                   patience=8),
    # neuron masking of the top attribution neurons (general neurons filtered out)
    "attribution_mask": dict(method="mask", scale="attribution", k=8),
    # contrastive: reference fine-tuned toward anti-stereotypical shares over the module, top-5000 |diff| taken
    "contrastive": dict(method="contrastive", scale="module", k=1, lr=1e-4, epochs=1, contrastive_k=5000),
}


def _weights(lm) -> dict[str, tuple[str, bool]]:
    """Our module label -> (HF weight name, transposed) for every block module."""
    from bias_lens.arch import param_ref

    kinds = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"] + (["mlp.gate"] if lm.arch.gated_mlp else [])
    out = {}
    for l in range(lm.n_layers):
        for kind in kinds:
            ref = param_ref(lm.hf, f"L{l}.{kind}")
            if ref.rows is None:
                out[f"L{l}.{kind}"] = (ref.weight_name, ref.transposed)
    return out


def grad_locate(lm, train: list[dict], scale: str) -> LocateResult:
    """First-order (gradient x weight) locator for the layer/module/row/neuron scales (fallback)."""
    from bias_lens.edit.finetune import _forward_probs
    from bias_lens.edit.losses import msme_align
    from bias_lens.edit.measure import he_she

    mods = _weights(lm)
    params = dict(lm.hf.named_parameters())
    names = {w for w, _ in mods.values()}
    leaves = {n: params[n].detach().clone().requires_grad_(True) for n in names}
    tid = torch.as_tensor(he_she(lm).first_ids)
    grads = {n: torch.zeros_like(t) for n, t in leaves.items()}
    for s in range(0, len(train), 32):
        batch = train[s : s + 32]
        f = torch.tensor([[x["f_he"], x["f_she"]] for x in batch], dtype=torch.float32)
        loss = msme_align(_forward_probs(lm, leaves, [x["prompt"] for x in batch], tid), f) * len(batch)
        for n, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values()))):
            grads[n] += g
    labels, scores = [], []
    for lab, (w, tr) in mods.items():
        g = grads[w].T if tr else grads[w]
        gw = (g * params[w].detach().T if tr else g * params[w].detach()).abs()
        if scale == "module":
            labels.append(lab), scores.append(float(gw.sum()))
        elif scale == "row" and lab.endswith("mlp.down"):
            labels += [f"{lab}/row{r}" for r in range(gw.shape[0])]
            scores += gw.sum(1).tolist()
        elif scale == "neuron" and lab.endswith("mlp.down"):
            top = torch.topk(g.abs().reshape(-1), 8192)
            cols = g.shape[1]
            labels += [f"{lab}/row{int(i) // cols}/col{int(i) % cols}" for i in top.indices]
            scores += top.values.tolist()
        elif scale == "layer":
            layer = lab.split(".")[0]
            if layer not in labels:
                labels.append(layer), scores.append(0.0)
            scores[labels.index(layer)] += float(gw.sum())
    return LocateResult(f"grad_x_weight_{scale}", labels, torch.tensor(scores), variant="msme_align,sum|g*w|",
                        model=lm.name, n_samples=len(train))


def locate_for(lm, plan: EditPlan, train: list[dict], module_json: str | None = None):
    from bias_lens.edit.pipeline import locate

    if plan.scale == "module":
        if module_json:
            return LocateResult.load(module_json)
        return LocateResult("fixed", [MODULE], torch.ones(1), variant="MSME's module (no scan)")
    if plan.scale in LOCATORS:
        mod, fn = LOCATORS[plan.scale]
        try:
            getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError):
            return grad_locate(lm, train, plan.scale)
    return locate(lm, plan, train)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    ap.add_argument("--out-jsonl", default="edit_rows.jsonl")
    ap.add_argument("--limit", type=int, default=COMMON["limit"])
    ap.add_argument("--no-org", action="store_true", help="do not re-measure the unedited model (another run did)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--module-json", default=None, help="a saved module_scale LocateResult (default: L29.mlp.down)")
    ap.add_argument("--set", action="append", default=[], metavar="ROW.KEY=VALUE", help="override a plan field")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from bias_lens.edit.measure import model_metrics
    from bias_lens.lens import load_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m")
    common = {**COMMON, "limit": args.limit}
    rows: dict[str, dict] = {}
    before: dict[str, float] = {}
    if not args.no_org:
        before = model_metrics(lm, "genbiaseval", "test", limit=common["limit"], ub_limit=common["ub_limit"],
                               retention_limit=common["retention_limit"])
        rows["org"] = {"row": "org", "after": before, "n_changed": 0, "mask_size": 0}
        with open(args.out_jsonl, "a") as fh:
            fh.write(json.dumps(rows["org"]) + "\n")
    for name in [r for r in args.rows.split(",") if r in ROWS]:
        spec = dict(ROWS[name])
        for s in args.set:
            key, val = s.split("=", 1)
            row, field = key.split(".", 1)
            if row == name:
                try:
                    spec[field] = json.loads(val)  # numbers, null, true/false
                except json.JSONDecodeError:
                    spec[field] = val  # plain strings such as a loss name
        plan = EditPlan(**{**common, **spec})
        t = time.time()
        train, _ = split_samples(plan)
        result = locate_for(lm, plan, train, args.module_json) if plan.method not in ("fpft", "prompt") else None
        run = run_edit(lm, plan, result, before=before)
        if run.handle is not None:
            run.handle.undo()
        rec = {"row": name, "plan": {k: v for k, v in spec.items()}, "after": run.after, "before": before,
               "n_changed": run.n_changed, "mask_size": run.mask_size, "labels": run.locate.get("labels", [])[:8],
               "status": run.info.get("status"), "best_step": run.info.get("best_step"),
               "history": run.info.get("history"), "seconds": round(time.time() - t, 1)}
        rows[name] = rec
        with open(args.out_jsonl, "a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")
        logging.info("%s: %s", name, {k: round(v, 4) for k, v in run.after.items()})
    with open(args.out_jsonl) as fh:
        print(table([json.loads(line) for line in fh if line.strip()]))


def table(recs: list[dict]) -> str:
    """Markdown table of the rows (last record per row name wins); needs an ``org`` row."""
    recs = list({r["row"]: r for r in recs}.values())
    b = next(r for r in recs if r["row"] == "org")["after"]
    head = "| row | AFGB | FBS | UB | perplexity | probe acc. | Cost-P | changed | AFGB change |\n|---|---|---|---|---|---|---|---|---|"
    lines = [head]
    for r in recs:
        a = r["after"]
        cut = 1 - a["afgb"] / b["afgb"]
        lines.append(f"| {r['row']} | {a['afgb']:.4f} | {a['fbs']:.4f} | {a['ub']:.4f} | {a['perplexity']:.1f} | "
                     f"{a['probe_accuracy']:.3f} | {r['mask_size']} | {r['n_changed']} | {-cut:+.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
