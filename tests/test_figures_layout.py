"""Figures read at a glance (issue 17 item 9): every figure function, rendered on a tiny result,
has titles that fit the canvas and text labels that neither overlap nor run off it; the edit
figures show the pronoun mass beside the gap.

Geometry is recomputed here from the figure's own layout (independently of bias_lens.plot.layout):
text is ~0.6 x font size wide per character and 1.2 x font size tall; data coordinates map to
pixels through the fixed axis ranges, annotation offsets (ax, ay) are pixels from the point.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from bias_lens.locate.result import LocateResult
from bias_lens.plot import attribution as pa
from bias_lens.plot import circuit as pc
from bias_lens.plot import edits as pe
from bias_lens.plot import gradients as pg
from bias_lens.plot import locate as pl
from bias_lens.plot import tracing as ptr

MODEL = "smollm2-135m-instruct-with-a-long-name"
MODULE_VARIANT = "zero weights+biases; block-output logit lens (norm=recompute); final effect"
DEFAULT_MARGIN = {"l": 80, "r": 80, "t": 100, "b": 80}  # plotly's defaults when a figure sets none
EDIT_NAMES = ["FPFT", "PB", "layer (MSME)", "layer (LFTF)", "module (MSME)", "module (LFTF)", "row (MSME)", "row (LFTF)",
              "neuron (MSME)", "neuron (LFTF)", "module (gap + UB anchor)", "neuron (MSME + UB anchor)",
              "attribution masking", "contrastive"]
# the committed run's trade-off points (perplexity, AFGB): several pairs sit on top of each other
EDIT_XY = [(320.32, 0.0646), (310.73, 0.1374), (311.047, 0.11951), (311.037, 0.11978), (318.20, 0.0686), (318.32, 0.0704),
           (312.8014, 0.103418), (312.8027, 0.103413), (319.08, 0.05386), (319.15, 0.05353), (324.76, 0.0607),
           (324.19, 0.0730), (321.15, 0.1283), (310.82, 0.12481)]


def _plain(text: str) -> str:
    return re.sub(r"<[^>]+>", "", text)


def _width(text: str, size: float) -> float:
    return 0.6 * size * len(_plain(text))


def _geometry(fig):
    lay = fig.layout
    W, H = lay.width or 700, lay.height or 450
    m = {k: (getattr(lay.margin, k) if getattr(lay.margin, k) is not None else v) for k, v in DEFAULT_MARGIN.items()}
    return W, H, m


def assert_titles_fit(fig) -> None:
    W, H, m = _geometry(fig)
    room = W - m["l"] - m["r"]
    title = fig.layout.title
    size = title.font.size or 17
    sub_size = (title.subtitle.font.size if title.subtitle and title.subtitle.font else None) or 12
    lines = [(t, size) for t in (title.text or "").split("<br>")]
    lines += [(t, sub_size) for t in ((title.subtitle.text if title.subtitle else None) or "").split("<br>") if t]
    for text, s in lines:
        assert _width(text, s) <= room, f"title line {text!r} is ~{_width(text, s):.0f}px wide, room {room}px"
    assert 10 + sum(1.2 * s for _, s in lines) <= m["t"], "title block taller than the top margin"
    for a in fig.layout.annotations:  # subplot titles and other paper-anchored text stay on the canvas
        if a.xref == "paper" and a.text:
            cx = m["l"] + a.x * room
            w = _width(a.text, a.font.size or 16)
            assert cx - w / 2 >= 0 and cx + w / 2 <= W, f"annotation {a.text!r} runs off the canvas"


def label_boxes(fig) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Pixel boxes of data-anchored annotations and of trace text labels."""
    W, H, m = _geometry(fig)
    pw, ph = W - m["l"] - m["r"], H - m["t"] - m["b"]
    boxes = []

    def extent(axis: str) -> tuple[float, float]:
        rng = getattr(fig.layout, f"{axis}axis").range
        if rng is not None:
            return tuple(rng)
        # autoranged: the data extent (plotly pads it, which only brings points closer together)
        vals = [float(v) for tr in fig.data for v in (getattr(tr, axis) or ()) if isinstance(v, (int, float))]
        return min(vals), max(vals)

    def to_px(x, y):
        (x0, x1), (y0, y1) = extent("x"), extent("y")
        return m["l"] + (x - x0) / ((x1 - x0) or 1) * pw, m["t"] + (1 - (y - y0) / ((y1 - y0) or 1)) * ph

    for a in fig.layout.annotations:
        if a.xref != "x":
            continue
        assert a.axref == "pixel" and a.showarrow, "data labels are offset in pixels with a leader line"
        px, py = to_px(a.x, a.y)
        cx, cy = px + a.ax, py + a.ay
        s = a.font.size or 12
        w, h = _width(a.text, s), 1.2 * s
        boxes.append((a.text, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)))
    for tr in fig.data:  # text printed by scatter traces at their points (textposition, 6 px from the marker)
        if "text" not in (getattr(tr, "mode", None) or "") or tr.text is None:
            continue
        texts = [tr.text] * len(tr.x) if isinstance(tr.text, str) else list(tr.text)
        where = tr.textposition if isinstance(tr.textposition, str) else "middle center"
        vert, horiz = where.split() if " " in where else ("middle", where)
        for t, x, y in zip(texts, tr.x, tr.y):
            px, py = to_px(x, y)
            s = (tr.textfont.size if tr.textfont and isinstance(tr.textfont.size, (int, float)) else None) or 12
            w, h = _width(t, s), 1.2 * s
            left = {"left": px - 6 - w, "center": px - w / 2, "right": px + 6}[horiz]
            top = {"top": py - 6 - h, "middle": py - h / 2, "bottom": py + 6}[vert]
            boxes.append((str(t), (left, top, left + w, top + h)))
    return boxes


def assert_labels_clear(fig) -> None:
    W, H, m = _geometry(fig)
    boxes = label_boxes(fig)
    for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
        overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
        assert not overlap and a[:2] != b[:2], f"labels {ta!r} and {tb!r} overlap"
    for t, (x0, y0, x1, y1) in boxes:  # inside the plot area: not clipped, off the axes and the colour bar
        assert m["l"] <= x0 and x1 <= W - m["r"] and m["t"] <= y0 and y1 <= H - m["b"], f"label {t!r} leaves the plot"


def check(fig) -> None:
    assert_titles_fit(fig)
    assert_labels_clear(fig)


# --------------------------------------------------------------------------- tiny results
def layer_result() -> LocateResult:
    per = torch.rand(6, 4, generator=torch.Generator().manual_seed(0)).double()
    return LocateResult("layer", [f"L{i}" for i in range(4)], per.mean(0), variant="norm=recompute", per_prompt=per,
                        extras={"per_sample_argmax": torch.bincount(per.argmax(1), minlength=4).tolist()},
                        model=MODEL, n_samples=6)


def bmi_results() -> tuple[LocateResult, LocateResult]:
    labels = [f"L{i}" for i in range(4)]
    res = LocateResult("bmi", labels, torch.tensor([0.1, 0.3, 0.2, 0.4], dtype=torch.float64),
                       variant="1-cos, mean over real positions then prompts", model=MODEL, n_samples=6)
    rob = LocateResult("bmi", labels, res.scores, variant="1-cos, robustness 5 seeds x 100 samples", model=MODEL,
                       n_samples=300, extras={"std": [0.01] * 4, "seeds": [0, 1, 2, 3, 4], "n": 100})
    return res, rob


def module_result() -> LocateResult:
    mods = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "attn", "mlp"]
    z = torch.rand(3, len(mods), generator=torch.Generator().manual_seed(1)).double()
    return LocateResult("module", [f"L{i}.{k}" for i in range(3) for k in mods], z.flatten(), variant=MODULE_VARIANT,
                        model=MODEL, n_samples=200,
                        extras={"matrix": z.tolist(), "matrix_final": (z / 2).tolist(), "layers": [0, 1, 2], "module_names": mods})


def neuron_result() -> LocateResult:
    s = torch.linspace(-1, 1, 3 * 8).double()
    return LocateResult("attribution", [f"L{l}N{k}" for l in range(3) for k in range(8)], s.abs(),
                        variant="neurons,norm=cached,rank=abs", model=MODEL, n_samples=10, extras={"signed": s})


def head_result() -> LocateResult:
    s = torch.linspace(-1, 1, 3 * 4).double()
    return LocateResult("attribution", [f"L{l}H{h}" for l in range(3) for h in range(4)], s.abs(),
                        variant="heads,norm=cached,rank=abs,o_bias=baseline", model=MODEL, n_samples=10, extras={"signed": s})


def row_result() -> LocateResult:
    cos = torch.linspace(-0.5, 0.9, 12).double()
    return LocateResult("row", [f"L29.mlp.down/row{r}" for r in range(12)], cos, variant="prompt-targets,cosine-descending,keep=0.5",
                        extras={"selected_rows": [0, 2, 4, 6, 8, 10], "module": "L29.mlp.down"}, model=MODEL, n_samples=10)


def entry_result() -> LocateResult:
    labels = [f"L29.mlp.down/row{r}/col{c}" for r, c in [(0, 3), (0, 7), (2, 1), (5, 9)]]
    return LocateResult("neuron", labels, torch.tensor([3.0, 1.0, 2.0, 4.0], dtype=torch.float64),
                        variant="top-entry-per-row-per-prompt,count", model=MODEL, n_samples=10,
                        extras={"module": "L29.mlp.down", "n_cols": 12, "n_entries": 4,
                                "max_importance": torch.ones(4), "mean_importance": torch.ones(4)})


def circuit_graph() -> dict:
    nodes = [{"label": f"L{l}N{1000 + l}", "layer": l, "kind": "neuron"} for l in range(20, 30)]
    nodes += [{"label": f"L{l}H{l % 9}", "layer": l, "kind": "head"} for l in range(20, 29)]
    nodes += [{"label": "embed", "layer": -1, "kind": "embed"}]
    edges = [{"source": n["label"], "target": "L29N1029", "weight": 0.1 * (i - 9)} for i, n in enumerate(nodes) if n["label"] != "L29N1029"]
    return {"nodes": nodes, "edges": edges, "root": "L29N1029"}


def edit_rows(mass: bool, renorm: bool) -> tuple[dict, list[dict]]:
    org = {"perplexity": 310.73, "afgb": 0.1248, **({"mass": 0.41} if mass else {}), **({"afgb_renorm": 0.30} if renorm else {})}
    rows = []
    for i, (name, (x, y)) in enumerate(zip(EDIT_NAMES, EDIT_XY)):
        met = {"perplexity": x, "afgb": y}
        if mass:
            met["mass"] = 0.3 + 0.01 * i
        if renorm:
            met["afgb_renorm"] = y / (0.3 + 0.01 * i)
        rows.append({"name": name, "metrics": met})
    return org, rows


def details(shift: float) -> list[dict]:
    profs = ["nurse", "registered nurse", "investment banker", "sheriff deputy", "carpenter"]
    return [{"profession": p, "p_he": 0.2 + 0.05 * i * shift + 0.01 * j, "p_she": 0.15 + 0.02 * j}
            for i, p in enumerate(profs) for j in range(3)]


def trace_result():
    from bias_lens.locate.tracing import ItemTrace, TraceResult

    g = torch.Generator().manual_seed(0)
    toks = ["<|im_start|>", "Under", " pressure", ",", " a", " female", " will", " often", " show", " that", " she", " is",
            " strong/ hysterical", "."]
    item = ItemTrace("e58324f9c51df9da8df232fac42271e2", toks, ["female", "she"], [5, 10], [12], 1.03, 0.5,
                     0.5 + 0.5 * torch.rand(3, 30, len(toks), generator=g, dtype=torch.float64))
    return TraceResult(("resid", "mlp", "attn"), [item], 30, 0.35, 3.0, 10, 10, 0,
                       "gap=abs (mean logp after BOS); noise=add 3 x std over knowns; n_noise=10; window=10", model=MODEL)


FIGURES = {
    "trace_heatmap": lambda: ptr.trace_heatmap(trace_result(), 0, "resid"),
    "trace_heatmap_mlp_restored": lambda: ptr.trace_heatmap(trace_result(), 0, "mlp", value="restored"),
    "trace_role_heatmap": lambda: ptr.trace_role_heatmap(trace_result(), "attn"),
    "layer_prompt_heatmap": lambda: pl.layer_prompt_heatmap(layer_result()),
    "argmax_histogram": lambda: pl.argmax_histogram(layer_result()),
    "layer_figure": lambda: pl.layer_figure(layer_result()),
    "layer_figure_custom_title": lambda: pl.layer_figure(layer_result(), title="Layer score (MSME Eq. 2) on GenBiasPro-CG"),
    "bmi_figure": lambda: pl.bmi_figure(*bmi_results()),
    "module_heatmap": lambda: pl.module_heatmap(module_result()),
    "module_heatmap_final": lambda: pl.module_heatmap(module_result(), final=True),
    "neuron_heatmap": lambda: pa.neuron_heatmap(neuron_result()),
    "neuron_heatmap_signed": lambda: pa.neuron_heatmap(neuron_result(), signed=True),
    "head_heatmap": lambda: pa.head_heatmap(head_result()),
    "row_cosine_histogram": lambda: pg.row_cosine_histogram(row_result()),
    "row_cosine_strip": lambda: pg.row_cosine_strip(row_result()),
    "entry_heatmap": lambda: pg.entry_heatmap(entry_result()),
    "circuit_figure": lambda: pc.circuit_figure(circuit_graph()),
    "profession_before_after": lambda: pe.profession_before_after(details(1.0), details(0.2), "neuron (MSME + UB anchor)"),
    "edits_tradeoff": lambda: pe.edits_tradeoff(*edit_rows(mass=True, renorm=True)),
    "edits_tradeoff_without_mass": lambda: pe.edits_tradeoff(*edit_rows(mass=False, renorm=False)),
}


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_titles_fit_and_labels_do_not_overlap(name):
    check(FIGURES[name]())


def _agreement() -> dict:
    from bias_lens.pipeline.locate_stage import layer_agreement

    return layer_agreement({"layer": layer_result(), "bmi": bmi_results()[0], "module": module_result()}, 4)


def test_pipeline_figures_are_the_plot_builders():
    from bias_lens.pipeline import figures as pf

    res, rob = bmi_results()
    figs = dict(pf.locate_figures({"layer": layer_result(), "bmi": res, "bmi_robustness": rob, "module": module_result(),
                                   "row": row_result(), "neuron": entry_result(), "attribution": neuron_result(),
                                   "heads": head_result(), "circuit": circuit_graph(),
                                   "agreement": _agreement()}))
    assert set(figs) >= {"layer_scores", "bmi", "module_heatmap", "row_cosines", "neuron_entries", "circuit",
                         "layer_agreement"}
    org, rows = edit_rows(mass=True, renorm=True)
    figs["edits_tradeoff"] = pf.table_figure(org, rows)
    figs["profession_before_after"] = pf.profession_bars(details(1.0), details(0.2), "module (MSME)")
    for fig in figs.values():
        check(fig)
    assert figs["edits_tradeoff"].to_plotly_json() == pe.edits_tradeoff(org, rows).to_plotly_json()


def test_module_title_keeps_the_variant_in_the_subtitle():
    fig = pl.module_heatmap(module_result())
    assert "MSME Eq. 3" in fig.layout.title.text and "block output" in fig.layout.title.text
    sub = _plain(fig.layout.title.subtitle.text.replace("<br>", " "))
    assert MODULE_VARIANT in sub and MODEL in sub and "n=200" in sub


def test_edits_tradeoff_plots_renormalised_afgb_coloured_by_mass():
    org, rows = edit_rows(mass=True, renorm=True)
    fig = pe.edits_tradeoff(org, rows)
    pts = {(round(x, 6), round(y, 6)) for tr in fig.data for x, y in zip(tr.x, tr.y)}
    want = {(round(m["perplexity"], 6), round(m["afgb_renorm"], 6)) for m in [org] + [r["metrics"] for r in rows]}
    assert pts == want
    edits = fig.data[1]
    assert list(edits.marker.color) == [r["metrics"]["mass"] for r in rows] and edits.marker.colorbar.title.text
    assert "renormalised" in fig.layout.yaxis.title.text
    labels = sorted(a.text for a in fig.layout.annotations if a.xref == "x")
    assert labels == sorted(["Org"] + EDIT_NAMES)  # every point keeps its label


def test_edits_tradeoff_without_new_keys_falls_back_to_raw_afgb():
    org, rows = edit_rows(mass=False, renorm=False)
    fig = pe.edits_tradeoff(org, rows)
    assert {round(y, 6) for tr in fig.data for y in tr.y} == {round(m["afgb"], 6) for m in [org] + [r["metrics"] for r in rows]}
    assert fig.data[1].marker.color is None and "renormalised" not in fig.layout.yaxis.title.text
    assert "not recorded" in fig.layout.title.subtitle.text
    # renorm on some rows only: the axis must not mix the two metrics
    rows[0]["metrics"]["afgb_renorm"] = 0.5
    assert "renormalised" not in pe.edits_tradeoff({**org, "afgb_renorm": 0.3}, rows).layout.yaxis.title.text


def test_profession_figure_shows_pronoun_mass_before_and_after():
    before, after = details(1.0), details(0.2)
    fig = pe.profession_before_after(before, after, "row (LFTF)", k=3)

    def mean(rows, prof, f):
        vals = [f(r) for r in rows if r["profession"] == prof]
        return sum(vals) / len(vals)

    gap = lambda r: r["p_he"] - r["p_she"]  # noqa: E731
    mass = lambda r: r["p_he"] + r["p_she"]  # noqa: E731
    change = {p: abs(mean(after, p, gap) - mean(before, p, gap)) for p in {r["profession"] for r in before}}
    top = sorted(change, key=lambda p: (-change[p], p))[:3]
    by_axis = {}
    for tr in fig.data:
        by_axis.setdefault(tr.yaxis, []).append(tr)
    assert len(by_axis) == 2, "one panel for the gap, one for the pronoun mass"
    (gap_traces, mass_traces) = (by_axis["y"], by_axis["y2"])
    for traces, f in ((gap_traces, gap), (mass_traces, mass)):
        assert [list(t.x) for t in traces] == [top, top]
        for t, rows in zip(traces, (before, after)):
            assert list(t.y) == pytest.approx([mean(rows, p, f) for p in top], abs=1e-12)
    assert "p(he) + p(she)" in fig.layout.yaxis2.title.text
