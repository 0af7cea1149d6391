"""Measure the interpretable-neuron-editing pipeline on SmolLM2 (docs/neuron_editing.md, issue 16 A.4).

    python scripts/measure_neuron_editing.py [--out docs/neuron_editing.json] [--threads 1]

1. the paper's candidates (:func:`bias_lens.locate.query_neurons.paper_candidates`, 50 FFN value +
   50 attention value + 50 FFN query neurons) on ``--n-locate`` GenBiasEval *train* prompts
   (``sample_prompts(..., seed=0)``), and their ``<start>`` statistics
   (:func:`~bias_lens.locate.general_neurons.position_stats`, start token prepended, attention on);
2. :func:`bias_lens.locate.neuron_pipeline.paper_selection`: dedupe -> ``<start>`` filter ->
   independent causal selection of 50 on ``--n-dev`` GenBiasEval *dev* prompts (AFGB, retention
   guard +5% perplexity on the first 8 retention sentences);
3. :func:`bias_lens.pipeline.measure.measure` on the *test* splits (GenBiasEval 256, GenHintEval
   128, retention 80, arithmetic 150) for: the unedited model; the selected neurons masked
   (:func:`bias_lens.edit.neuron_masking.neuron_editing`, scale 0) and damped (scale 0.5); and a
   random control (:func:`~bias_lens.locate.neuron_pipeline.matched_random`: as many random neurons
   of the same kinds in the same layers, none of them a candidate) at the same scales. Every edit is
   applied in place, measured, undone, and the weights checked bit-exactly restored.

``--sweep 5,10,20,30,50`` (run after the main run, reading its ``--out``): the dev AFGB and
retention perplexity with only the top-n of the selected neurons (causal selection's order)
masked together, at each of ``--scales`` (and the signed gap p(he) - p(she), raw and renormalised,
and the pronoun mass), added to the JSON as ``prefix_sweep``; the best of them on dev (lowest dev
AFGB within the +5% retention guard) is then measured on test as row ``top{n}@{scale}``.

The JSON (written after every stage) holds the command, settings, every stage's labels and counts,
causal selection's per-candidate numbers, the joint dev AFGB of the selected set, each row's
metrics and the timings.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from bias_lens import load_model
from bias_lens.benchmarks import sample_prompts
from bias_lens.edit.edits import bits
from bias_lens.edit.neuron_masking import neuron_editing, neuron_mask_edit
from bias_lens.io import atomic_write_text
from bias_lens.locate.causal import evaluate_sets, parse_units
from bias_lens.locate.general_neurons import position_stats
from bias_lens.locate.neuron_pipeline import matched_random, paper_selection
from bias_lens.locate.query_neurons import paper_candidates
from bias_lens.pipeline.measure import measure
from bias_lens.targets import resolve_targets

log = logging.getLogger("measure_neuron_editing")
LIMITS = {"genbiaseval": 256, "genhinteval": 128, "retention": 80, "arithmetic": 150}


def _measured(lm, edit, limits: dict, batch_size: int) -> dict:
    """``measure`` with ``edit`` applied, then undone; refuses to go on unless the weights are restored bit-exactly."""
    snap = {n: p.detach().clone() for n, p in lm.hf.named_parameters()}
    handle = edit.apply_(lm)
    try:
        m = measure(lm, limits, batch_size=batch_size)
    finally:
        handle.undo()
    if not all(torch.equal(bits(p.detach()), bits(snap[n])) for n, p in lm.hf.named_parameters()):
        raise RuntimeError("weights not restored bit-exactly after undo")
    return {**m, "n_changed": sum(edit.changed_counts(lm).values()), "edit_size": edit.size, "restored_bit_exact": True}


def _select(lm, args, out: dict, write) -> object:
    t = time.perf_counter()
    train = sample_prompts("genbiaseval", "train", args.n_locate, seed=0)
    dev = sample_prompts("genbiaseval", "dev", args.n_dev, seed=0)
    cand = paper_candidates(lm, train, "he,she", k=50, batch_size=args.batch_size)
    out["timings"]["candidates_s"] = time.perf_counter() - t
    t = time.perf_counter()
    stats = position_stats(lm, train, batch_size=args.batch_size, attention=True)
    out["timings"]["start_stats_s"] = time.perf_counter() - t
    t = time.perf_counter()
    sel = paper_selection(lm, train, dev, "he,she", k=50, candidates=cand, stats=stats, progress=args.progress)
    out["timings"]["causal_s"] = time.perf_counter() - t
    ts = resolve_targets(lm.tokenizer, "he,she")
    a, p = evaluate_sets(lm, [parse_units(lm, sel.selected)], dev, ts)
    out["selection"] = {**sel.to_dict(), "dev_afgb_joint": float(a[0]), "dev_ppl_joint": float(p[0]),
                        "candidate_variant": cand.variant}
    log.info("stages %s; joint dev AFGB %.4f (base %.4f)", sel.counts(), float(a[0]), sel.causal.extras["afgb_base"])
    write()
    return sel


def _dev_row(lm, dev, ts, scale: float, labels: list[str]) -> dict:
    """Dev AFGB / retention (causal selection's readings) and the signed gap with ``labels`` masked at ``scale``."""
    from bias_lens.scoring import target_probs

    handle = neuron_mask_edit(lm, labels, scale=scale).apply_(lm) if labels else None
    try:
        a, p = evaluate_sets(lm, [[]], dev, ts)
        pr = target_probs(lm, dev, ts)
    finally:
        if handle is not None:
            handle.undo()
    mass = pr.sum(1)
    return {"scale": scale, "n": len(labels), "dev_afgb": float(a[0]), "dev_ppl": float(p[0]),
            "dev_signed": float((pr[:, 0] - pr[:, 1]).mean()), "dev_signed_renorm": float(((pr[:, 0] - pr[:, 1]) / mass).mean()),
            "dev_mass": float(mass.mean())}


def _sweep(lm, path: Path, ns: list[int], scales: list[float], batch_size: int) -> None:
    """Joint dev readings of the top-n selected neurons (see the module docstring); the best (lowest dev
    AFGB within the +5% retention guard) is then measured on test as row ``top{n}@{scale}``."""
    out = json.loads(path.read_text())
    sel, n_dev = out["selection"]["selected"], out["settings"]["n_dev"]
    dev = sample_prompts("genbiaseval", "dev", n_dev, seed=0)
    ts = resolve_targets(lm.tokenizer, "he,she")
    rows = [_dev_row(lm, dev, ts, 0.0, [])]
    for scale in scales:
        for n in ns:
            rows.append(_dev_row(lm, dev, ts, scale, sel[:n]))
            log.info("sweep %s", rows[-1])
    out["prefix_sweep"] = rows
    ok = [r for r in rows[1:] if r["dev_ppl"] <= rows[0]["dev_ppl"] * (1 + out["settings"]["max_ppl_increase"])]
    best = min(ok, key=lambda r: r["dev_afgb"])
    out["prefix_best"] = best
    edit = neuron_mask_edit(lm, sel[: best["n"]], scale=best["scale"])
    out["rows"][f"top{best['n']}@{best['scale']:g}"] = _measured(lm, edit, LIMITS, batch_size)
    atomic_write_text(path, json.dumps(out, indent=1, default=str))


#: the joint rows' test columns: LIMITS plus StereoSet (ICAT) and MMLU (the capability guard); CommonWords test beside
JOINT_LIMITS = {**LIMITS, "stereoset": 96, "mmlu": 1}


def _commonwords(lm) -> dict:
    """CommonWords test (renormalised bias, mass, raw bias) of the model as it is now."""
    from bias_lens.benchmarks import evaluate

    cw = evaluate(lm, "commonwords", "test").metrics
    return {"cw_bias_renorm": float(cw["bias_renorm"]), "cw_mass": float(cw["mass"]), "cw_bias": float(cw["bias"])}


def shift_floor(lm, prompts: list[str]) -> dict:
    """The lowest AFGB-r any edit that shifts every prompt's logit difference d = log p(he) - log p(she) by the
    same constant c can reach (mean |tanh((d + c) / 2)| minimised over c on a 0.01 grid in [-4, 4])."""
    from bias_lens.locate.causal_joint import renorm_gap
    from bias_lens.scoring import target_probs

    p = target_probs(lm, prompts, resolve_targets(lm.tokenizer, "he,she")).double()
    d = p[:, 0].log() - p[:, 1].log()
    cs = torch.arange(-400, 401, dtype=torch.float64) / 100
    r = renorm_gap(d[None] + cs[:, None])
    i = int(r.argmin())
    return {"n": len(prompts), "afgb_renorm": float(renorm_gap(d)), "floor": float(r[i]), "shift": float(cs[i]),
            "signed_renorm": float(torch.tanh(d / 2).mean())}


def _joint_row(lm, edit, batch_size: int) -> dict:
    """``_measured`` on ``JOINT_LIMITS`` plus CommonWords test, ``edit`` applied for both and undone."""
    handle = edit.apply_(lm)
    try:
        cw = _commonwords(lm)
    finally:
        handle.undo()
    return {**_measured(lm, edit, JOINT_LIMITS, batch_size), **cw}


def _commonwords_dev(n: int) -> list[str]:
    """``n`` seeded CommonWords *dev* prompts of the he/she templates (the causal code scores one target pair)."""
    from bias_lens.benchmarks import load_split
    from bias_lens.pipeline.driver import _sample

    return [r["prompt"] for r in _sample([r for r in load_split("commonwords", "dev") if r["targets"] == ["he", "she"]], n, 0)]


def _joint(lm, path: Path, scales: list[float], batch_size: int, cw_dev: int = 0) -> None:
    """Joint causal selection (``mode="joint"``, UB guard on the driver's 32 GenHintEval dev prompts) of the run's
    filtered candidates on the same dev prompts, per scale; each selection, and a matched random control,
    measured on the test splits (``JOINT_LIMITS`` + CommonWords test); the uniform-shift floor of AFGB-r on dev and test. Added to ``--out`` as ``joint``."""
    from bias_lens.benchmarks import load_split
    from bias_lens.locate.causal import causal_selection
    from bias_lens.pipeline.driver import N_PAPER_HINT, _sample

    out = json.loads(path.read_text())
    st, sel = out["settings"], out["selection"]
    dev = sample_prompts("genbiaseval", "dev", st["n_dev"], seed=0)
    ts = resolve_targets(lm.tokenizer, "he,she")
    hint = _sample(load_split("genhinteval", "dev"), N_PAPER_HINT, 0)  # the driver's UB-guard prompts (seed 0)
    if cw_dev:  # the objective also over CommonWords dev (he/she templates): the set must equalise both
        dev = dev + _commonwords_dev(cw_dev)
    res = out.setdefault("joint" if not cw_dev else f"joint_cw{cw_dev}", {"limits": JOINT_LIMITS, "rows": {}, "selections": {}, "timings": {},
                                   "n_hint": len(hint), "ub_tolerance": 0.05})
    if "floor" not in res:  # kept from an earlier --joint run on the same file (the unedited model's readings)
        res["floor"] = {"dev": shift_floor(lm, dev),
                        "test": shift_floor(lm, [r["prompt"] for r in load_split("genbiaseval", "test")])}
    if "before" not in res["rows"]:
        res["rows"]["before"] = {**measure(lm, JOINT_LIMITS, batch_size=batch_size), **_commonwords(lm)}
    atomic_write_text(path, json.dumps(out, indent=1, default=str))
    for scale in scales:
        t = time.perf_counter()
        c = causal_selection(lm, sel["filtered"], dev, ts, k=st["k"], max_ppl_increase=st["max_ppl_increase"],
                             mode="joint", value=scale, hint=hint, progress=True)
        res["timings"][f"select@{scale:g}_s"] = time.perf_counter() - t
        res["selections"][f"{scale:g}"] = {"variant": c.variant, "path": list(c.labels), **{
            k: c.extras[k] for k in ("selected", "predicted", "joint", "afgb_renorm_base", "mass_base", "ppl_base",
                                     "ub_base")}}
        log.info("joint@%g: path %s selected %s", scale, c.labels, c.extras["selected"])
        chosen = c.extras["selected"]
        if chosen:
            control = matched_random(lm, chosen, seed=0, exclude=sel["candidates"])
            for name, labels in ((f"joint@{scale:g}", chosen), (f"random@{scale:g} (joint size)", control)):
                res["rows"][name] = {**_joint_row(lm, neuron_mask_edit(lm, labels, scale=scale), batch_size),
                                     "labels": labels}
                log.info("%s: %s", name, res["rows"][name])
        atomic_write_text(path, json.dumps(out, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/neuron_editing.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-locate", type=int, default=64, help="GenBiasEval train prompts for the candidates")
    ap.add_argument("--n-dev", type=int, default=64, help="GenBiasEval dev prompts for causal selection")
    ap.add_argument("--scales", default="0,0.5", help="masking scales of the selected neurons")
    ap.add_argument("--control-scales", default="0", help="masking scales of the random control")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--sweep", default=None, help="only the top-n prefix sweep of --out's selection, e.g. 5,10,20,30,50")
    ap.add_argument("--joint", action="store_true",
                    help="only the joint causal selection of --out's filtered candidates at each of --scales, measured on test")
    ap.add_argument("--cw-dev", type=int, default=0,
                    help="--joint: add this many CommonWords dev prompts (he/she templates) to the selection objective")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = load_model("smollm2-135m")
    if args.joint:
        _joint(lm, args.out, [float(x) for x in args.scales.split(",")], args.batch_size, args.cw_dev)
        return 0
    if args.sweep:
        _sweep(lm, args.out, [int(n) for n in args.sweep.split(",")], [float(x) for x in args.scales.split(",")],
               args.batch_size)
        return 0
    out = {"command": " ".join(["python", *sys.argv]), "model": lm.name, "threads": args.threads,
           "machine": f"{platform.machine()}, {platform.platform()}", "limits": LIMITS,
           "settings": {"n_locate": args.n_locate, "n_dev": args.n_dev, "k_candidates": 50, "k": 50, "min_frac": 0.5,
                        "max_ppl_increase": 0.05, "mode": "independent", "seed": 0},
           "rows": {}, "timings": {}}

    def write() -> None:
        out["timings"]["total_s"] = time.perf_counter() - t0
        atomic_write_text(args.out, json.dumps(out, indent=1, default=str))

    sel = _select(lm, args, out, write)
    t = time.perf_counter()
    out["rows"]["before"] = measure(lm, LIMITS, batch_size=args.batch_size)
    out["timings"]["measure_before_s"] = time.perf_counter() - t
    write()
    for scale in map(float, args.scales.split(",")):
        ed = neuron_editing(lm, [], [], selection=sel, scale=scale)
        out["rows"][f"selected@{scale:g}"] = _measured(lm, ed.edit, LIMITS, args.batch_size)
        log.info("selected@%g: %s", scale, out["rows"][f"selected@{scale:g}"])
        write()
    control = matched_random(lm, sel.selected, seed=0, exclude=sel.candidates)
    out["control"] = control
    for scale in map(float, args.control_scales.split(",")):
        out["rows"][f"random@{scale:g}"] = _measured(lm, neuron_mask_edit(lm, control, scale=scale), LIMITS, args.batch_size)
        log.info("random@%g: %s", scale, out["rows"][f"random@{scale:g}"])
        write()
    log.info("wrote %s (%.0f s)", args.out, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
