"""Train one BiasEdit editor on SmolLM2 and score it (docs/biasedit.md's tables).

Usage: ``python scripts/measure_biasedit.py NAME [key=value ...] [--out docs/biasedit_rows.jsonl]``
with :class:`~bias_lens.edit.editor.EditorConfig` fields as ``key=value`` (``modules=L27.mlp.down,L28.mlp.down``).
Appends one JSON row: the config, the training history, and per axis (gender, race, religion) the
unedited scores, the paper's test-time protocol (:func:`~bias_lens.pipeline.biasedit.protocol_eval`)
and the transfer edit from ``n_edits`` seeded train requests of that axis (the exported edit,
:func:`~bias_lens.pipeline.driver.editor_requests`, :func:`~bias_lens.pipeline.biasedit.transfer_eval`),
on every ``--sets`` entry (test selections, the reversal and synonym sets). Trains on the train split only; early stopping
uses the dev split; test items are scored, never trained on.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from bias_lens import load_model
from bias_lens.benchmarks.datasets import load_split
from bias_lens.benchmarks.stereoset_train import editor_splits
from bias_lens.edit.editor import Editor, EditorConfig
from bias_lens.edit.editor_train import train_editor
from bias_lens.edit.edits import bits
from bias_lens.edit.editor import editor_edit
from bias_lens.pipeline.biasedit import crows_protocol_eval, protocol_eval, transfer_eval, unedited_eval
from bias_lens.pipeline.driver import editor_requests

log = logging.getLogger("measure_biasedit")


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` strings as EditorConfig keyword arguments (types from the dataclass defaults)."""
    types = {f.name: f.type for f in fields(EditorConfig)}
    out: dict = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types:
            raise SystemExit(f"unknown EditorConfig field {key!r}")
        default = getattr(EditorConfig(), key)
        if key == "modules":
            out[key] = tuple(value.split(","))
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif value.lower() == "none":
            out[key] = None
        elif isinstance(default, int) and not isinstance(default, bool):
            out[key] = int(value)
        elif isinstance(default, float) or default is None:
            out[key] = float(value)
        else:
            out[key] = value
    return out


#: (axis, split) of every scored set: BiasEdit's test selections and its robustness sets
#: (``crows:AXIS``: CrowS-Pairs of that bias type under the same protocol, the cross-benchmark set)
ALL_SETS = ("gender:test", "gender:reverse", "gender:synonym", "race:test", "race:synonym", "religion:test",
            "religion:synonym", "crows:gender")


def choose_scale(lm, editor, dev: list[dict], scales: list[float], max_lms_drop: float = 10.0) -> dict:
    """The shift scale chosen on the *dev* split (every bias type, the paper's protocol, mean log-prob
    reading): the scale whose SS is closest to 50 among those losing at most ``max_lms_drop`` LMS points
    against the unedited dev items (the issue's LMS criterion); 1.0 if none qualifies."""
    base = unedited_eval(lm, dev)
    per = {str(s): protocol_eval(lm, editor, dev, scale=s) for s in scales}
    ok = [s for s in scales if per[str(s)]["lms"] >= base["lms"] - max_lms_drop]
    chosen = min(ok, key=lambda s: (abs(per[str(s)]["ss"] - 50), s)) if ok else 1.0
    log.info("dev scale choice: before SS %.1f LMS %.1f; %s -> %s", base["ss"], base["lms"],
             {s: (round(v["ss"], 1), round(v["lms"], 1)) for s, v in per.items()}, chosen)
    return {"n_dev": len(dev), "before": base, "per_scale": per, "max_lms_drop": max_lms_drop, "chosen": chosen}


def score_crows(lm, editor, axis: str, n_edits: int, seed: int, scale: float = 1.0) -> dict:
    """CrowS-Pairs (``axis``) unedited, under the protocol, and after the transfer edit from StereoSet train requests."""
    rows = load_split("crows-pairs", "test", axis=axis)
    handle = editor_edit(lm, editor, editor_requests(axis, n_edits, seed), scale=scale).apply_(lm.hf)
    try:
        transfer = crows_protocol_eval(lm, None, rows)
    finally:
        handle.undo()
    out = {"n": len(rows), "before": crows_protocol_eval(lm, None, rows),
           "protocol": crows_protocol_eval(lm, editor, rows, scale=scale), "transfer": transfer}
    log.info("crows/%s: %s", axis, {k: round(v["crows"], 1) for k, v in out.items() if k != "n"})
    return out


def score_set(lm, editor, axis: str, split: str, n_edits: int, seed: int, scale: float = 1.0) -> dict:
    """Unedited, protocol and transfer scores (both readings) of one StereoSet set (``axis="crows"``:
    CrowS-Pairs), the shift times ``scale``."""
    if axis == "crows":
        return score_crows(lm, editor, split, n_edits, seed, scale)
    rows = load_split("stereoset", split, axis=axis)
    requests = editor_requests(axis, n_edits, seed)
    out = {"n": len(rows), "before": unedited_eval(lm, rows), "protocol": protocol_eval(lm, editor, rows, scale=scale),
           "transfer": transfer_eval(lm, editor, requests, rows, scale=scale)}
    log.info("%s/%s: %s", axis, split, {k: {m: round(v[m], 1) for m in ("ss", "lms", "ss_mean_prob")}
                                        for k, v in out.items() if k != "n"})
    return out


def _cfg_label(row: dict) -> str:
    """The non-default config fields of a row, e.g. ``loss=pair_kl, modules=L29``."""
    base, cfg = asdict(EditorConfig()), row["config"]
    diff = {k: v for k, v in cfg.items() if k != "modules" and base.get(k) != v and k not in ("max_minutes",)}
    mods = cfg.get("modules") or []
    layers = ",".join(m.split(".")[0][1:] for m in mods)
    scale = [f"shift x{row['scale']:g} (dev-chosen)"] if row.get("scale", 1.0) != 1.0 else []
    return ", ".join([f"{k}={v}" for k, v in diff.items()] + ([f"layers {layers}"] if layers else []) + scale)


def _cell(m: dict, key: str) -> str:
    return f"{m[key]:.1f}" if key in m else "–"


def render_tables(rows: list[dict]) -> str:
    """Two markdown tables of measured rows: gender test (both readings, protocol and transfer), and the
    protocol SS / LMS of the robustness sets and the other bias types."""
    head = ("| row | config | train | reading | SS before | SS protocol | SS transfer | LMS before | LMS protocol | "
            "LMS transfer | ICAT before | ICAT protocol | ICAT transfer |")
    out = [head, "|" + "---|" * 13]
    for r in rows:
        g = r["sets"].get("gender:test")
        if g is None:
            continue
        train = f"{r['train_seconds'] / 60:.0f} min, {len(r['history'])} ep ({r['status']})" if "history" in r else "loaded"
        for suffix, name in (("", "mean log-prob"), ("_mean_prob", "mean prob")):
            cells = [_cell(g[k], f"{m}{suffix}") for m in ("ss", "lms", "icat") for k in ("before", "protocol", "transfer")]
            out.append(f"| {r['name']} | {_cfg_label(r)} | {train} | {name} | " + " | ".join(cells) + " |")
    sets = [k for k in ALL_SETS if any(k in r["sets"] for r in rows) and not k.startswith("crows:")]
    crows = [k for k in ALL_SETS if any(k in r["sets"] for r in rows) and k.startswith("crows:")]
    out += ["", "| row | reading | " + " | ".join(f"{k} SS / LMS (before -> protocol)" for k in sets)
            + "".join(f" | CrowS {k[6:]} (before -> protocol; transfer)" for k in crows) + " |",
            "|" + "---|" * (len(sets) + len(crows) + 2)]
    for r in rows:
        for suffix, name in (("", "mean log-prob"), ("_mean_prob", "mean prob")):
            cells = []
            for k in sets:
                m = r["sets"].get(k)
                cells.append("–" if m is None else f"{_cell(m['before'], 'ss' + suffix)} -> {_cell(m['protocol'], 'ss' + suffix)}"
                             f" / {_cell(m['before'], 'lms' + suffix)} -> {_cell(m['protocol'], 'lms' + suffix)}")
            for k in crows:  # CrowS has one reading (summed log-prob): shown on the first line only
                m = r["sets"].get(k)
                cells.append("–" if m is None or suffix else
                             f"{_cell(m['before'], 'crows')} -> {_cell(m['protocol'], 'crows')}; {_cell(m['transfer'], 'crows')}")
            out.append(f"| {r['name']} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name", nargs="?", default=None)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--out", default="docs/biasedit_rows.jsonl")
    ap.add_argument("--sets", default=",".join(ALL_SETS), help="axis:split pairs to score")
    ap.add_argument("--save", default=None, help="folder to save the trained editor in")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--load", default=None, help="score a saved editor instead of training one (overrides ignored)")
    ap.add_argument("--tables", action="store_true", help="print the tables of --out's rows and exit")
    ap.add_argument("--scales", default=None, help="comma-separated shift scales: choose one on the dev split "
                    "(protocol, SS closest to 50 with LMS drop <= 10) and score every set with it")
    args = ap.parse_args()
    if args.tables:
        print(render_tables([json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]))
        return
    if not args.name:
        ap.error("NAME is required (the row's name) unless --tables")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = EditorConfig(**parse_overrides(args.overrides))
    lm = load_model("smollm2-135m")
    before_bits = {k: bits(v) for k, v in lm.hf.state_dict().items()}
    t0 = time.monotonic()
    if args.load:
        editor = Editor.load(lm, args.load)
        row = {"name": args.name, "config": asdict(editor.config), "loaded": args.load}
    else:
        train, dev = editor_splits(cfg.seed)
        res = train_editor(lm, train, dev, cfg)
        editor = res.editor
        row = {"name": args.name, "config": asdict(editor.config), "status": res.status, "best_epoch": res.best_epoch,
               "train_seconds": res.seconds, "history": res.history, "n_train": len(train), "n_dev": len(dev),
               "unedited_dev": res.unedited, "beats_unedited": res.beats_unedited}
    if args.save:
        editor.save(args.save)
    scale = 1.0
    if args.scales:
        row["scale_choice"] = choose_scale(lm, editor, editor_splits(editor.config.seed)[1],
                                           [float(x) for x in args.scales.split(",")])
        scale = row["scale_choice"]["chosen"]
    row["scale"] = scale
    row["sets"] = {key: score_set(lm, editor, *key.split(":"), editor.config.n_edits, editor.config.seed, scale)
                   for key in args.sets.split(",")}
    row["model_unchanged"] = all(torch.equal(bits(v), before_bits[k]) for k, v in lm.hf.state_dict().items())
    row["wall_s"] = time.monotonic() - t0
    with Path(args.out).open("a") as f:
        f.write(json.dumps(row) + "\n")
    log.info("done %s in %.0f s", args.name, row["wall_s"])


if __name__ == "__main__":
    main()
