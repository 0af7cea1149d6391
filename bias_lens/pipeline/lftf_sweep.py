"""LFTF as written: fine-tune the block BMI ranks first, its rank sweep and its ablation table.

LFTF (Locating First and Then Fine-Tuning) ranks the blocks by BMI (Eq. 4,
``1 - cos(H^(i), H^(i+1))``, :func:`bias_lens.locate.layers.bmi`) **in descending order** and
fine-tunes the first one with its Eq. 5 loss ``p(he) + p(she)``. A BMI
:class:`~bias_lens.locate.result.LocateResult` has ``ascending=False``, so its ``order()`` (rank 0
first) is exactly that descending ranking; :func:`block_at_rank` respects ``ascending`` for any
layer-label result, so a result whose low scores mean "important" is ranked the other way round.

The paper's two comparisons, as :class:`LftfRow` data (:func:`lftf_rows`):

* rank sweep: the block at BMI rank 0 (top), ``L // 2`` (middle) and ``L - 1`` (last), same loss
  and training settings;
* ablation table on the top block: full (attention + MLP, Eq. 5), w/o attention and w/o MLP
  (mask changes: :func:`bias_lens.edit.masks.without_attention` / ``without_mlp``; the block's norm
  weights stay in both), w/o the he term (loss ``lftf_no_he`` = ``p(she)``) and w/o the she term
  (``lftf_no_she`` = ``p(he)``).

The "full, top" row is shared by both tables (7 trainings for 8 table cells). Each row's plan edits
``Where("layer", k=1)``; :func:`located_at_rank` turns the BMI result into the one-label result
:func:`bias_lens.pipeline.driver.apply_plan` takes, so the plan's top-1 label is the chosen block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..edit.methods import Finetune
from ..labels import LayerLabel, try_parse
from ..locate.result import LocateResult
from .plan import EditPlan, Where

#: the rank-sweep positions (0-based BMI rank) as functions of the number of blocks
SWEEP = {"top": lambda n: 0, "middle": lambda n: n // 2, "last": lambda n: n - 1}


def _check_layers(result: LocateResult) -> None:
    bad = [lab for lab in result.labels if not isinstance(try_parse(lab), LayerLabel)]
    if bad or not result.labels:
        raise ValueError(f"{result.method}: LFTF ranks whole blocks (labels L0..L{{n-1}}); got {bad[:3] or 'no labels'}; "
                         "pass a layer-scale result such as bias_lens.locate.layers.bmi(...)")


def block_at_rank(result: LocateResult, rank: int) -> str:
    """The block label at 0-based ``rank`` of ``result``'s ranking (``order()``: descending scores,
    ascending ones when ``result.ascending``; ties keep label order). ``rank=-1`` is the last."""
    _check_layers(result)
    n = len(result.labels)
    if not -n <= rank < n:
        raise ValueError(f"rank {rank} out of range for {n} ranked blocks; use 0..{n - 1} (or -1 for the last)")
    return result.labels[result.order()[rank]]


def located_at_rank(result: LocateResult, rank: int) -> LocateResult:
    """A one-label result holding the block at ``rank`` (its own score), to feed ``apply_plan``;
    the full ranking and the chosen rank are kept in ``extras``."""
    label = block_at_rank(result, rank)
    order = result.order()
    rank = rank % len(result.labels)
    return LocateResult(
        method=result.method, labels=[label], scores=result.scores[[order[rank]]],
        variant=f"{result.variant}; block at rank {rank}", model=result.model, n_samples=result.n_samples,
        extras={"rank": rank, "ranking": [result.labels[i] for i in order], "source": result.method},
    )


@dataclass(frozen=True)
class LftfRow:
    """One LFTF training: the block at BMI ``rank`` edited by ``plan``; ``tables``: where it appears."""

    key: str
    rank: int
    plan: EditPlan
    tables: tuple[str, ...]


def lftf_rows(n_layers: int, training: dict[str, Any] | None = None) -> tuple[LftfRow, ...]:
    """The 7 trainings of the rank sweep and the ablation table (``training``: the fine-tuning
    settings shared by every row, e.g. ``FULL_TRAINING``; the learning rate is the layer scale's)."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    t = dict(training or {})
    for k in ("paper", "loss"):
        if k in t:
            raise ValueError(f"training settings must not set {k!r}: each row sets its own LFTF loss")

    def plan(name: str, loss: str | None = None, drop: str | None = None) -> EditPlan:
        return EditPlan(Finetune(paper="lftf", loss=loss, **t), Where("layer", k=1, drop=drop), name=name)

    rank = {k: f(n_layers) for k, f in SWEEP.items()}
    return (
        LftfRow("top", 0, plan("LFTF, BMI rank 0 (full)"), ("rank", "ablation")),
        LftfRow("middle", rank["middle"], plan(f"LFTF, BMI rank {rank['middle']}"), ("rank",)),
        LftfRow("last", rank["last"], plan(f"LFTF, BMI rank {rank['last']}"), ("rank",)),
        LftfRow("no_attention", 0, plan("LFTF w/o attention", drop="attention"), ("ablation",)),
        LftfRow("no_mlp", 0, plan("LFTF w/o MLP", drop="mlp"), ("ablation",)),
        LftfRow("no_he", 0, plan("LFTF w/o he term", loss="lftf_no_he"), ("ablation",)),
        LftfRow("no_she", 0, plan("LFTF w/o she term", loss="lftf_no_she"), ("ablation",)),
    )


# --------------------------------------------------------------------------- tables (docs/lftf.md)
#: the two tables of the paper's comparison: table name -> row keys, in order
TABLES: dict[str, tuple[str, ...]] = {"rank": ("top", "middle", "last"),
                                      "ablation": ("top", "no_attention", "no_mlp", "no_he", "no_she")}
#: the ablation table's row names
ABLATION_TITLES = {"top": "LFTF (attention + MLP, he + she)", "no_attention": "w/o attention",
                   "no_mlp": "w/o MLP", "no_he": "w/o he term", "no_she": "w/o she term"}
#: metric columns: record key, header, format, format of the change vs Org (relative; None: not shown)
TABLE_METRICS: tuple[tuple[str, str, str, str | None], ...] = (
    ("afgb", "AFGB", "{:.4f}", "{:+.1%}"), ("afgb_renorm", "AFGB-r", "{:.4f}", "{:+.1%}"),
    ("mass", "p_he+p_she", "{:.4f}", "{:+.1%}"), ("fbs", "FBS", "{:.4f}", None), ("ub", "UB", "{:.4f}", None),
    ("perplexity", "PPL (neutral)", "{:.2f}", "{:+.2%}"), ("mmlu", "MMLU", "{:.3f}", None),
    ("arithmetic", "Arith", "{:.3f}", None),
)


def _cell(value: Any, fmt: str, org: Any = None, change: str | None = None) -> str:
    """``value`` formatted; with ``org`` and a ``change`` format, followed by its relative change
    vs ``org``, e.g. ``0.1154 (-7.6%)``; ``–`` when the value is missing."""
    if not isinstance(value, (int, float)):
        return "–"
    out = fmt.format(value)
    if change is not None and isinstance(org, (int, float)) and org != 0:
        out += f" ({change.format((value - org) / abs(org))})"
    return out


def lftf_table(results: dict[str, Any], table: str) -> str:
    """One table of :func:`scripts/measure_lftf.py`'s JSON as Markdown: the unedited model (Org),
    then every row of ``table`` (``"rank"`` or ``"ablation"``, :data:`TABLES`); metric columns
    are the :data:`TABLE_METRICS` present in the records, rows not (yet) run say so."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}")
    org = results["before"]
    recs = {r["key"]: r for r in results.get("rows", [])}
    bmi = results.get("bmi") or {}
    bmi_of = dict(zip(bmi.get("labels", []), bmi.get("scores", [])))
    cols = [c for c in TABLE_METRICS
            if c[0] in org or any(c[0] in r["record"]["metrics"] for r in recs.values())]
    head = ["Row", "Block (BMI rank)", "BMI", "Weights changed", *[h for _, h, _, _ in cols], "Best step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| Org (unedited) | – | – | 0 | " + " | ".join(_cell(org.get(k), f) for k, _, f, _ in cols) + " | – |"]
    for key in TABLES[table]:
        r = recs.get(key)
        title = ABLATION_TITLES[key] if table == "ablation" else key
        if r is None:
            lines.append(f"| {title} | " + " | ".join(["not run"] + ["–"] * (len(head) - 2)) + " |")
            continue
        rec, m = r["record"], r["record"]["metrics"]
        block = r["block"]
        cells = [title, f"{block} ({r['rank']})", _cell(bmi_of.get(block), "{:.4f}"),
                 f"{rec['n_changed']:,} of {rec['cost_p']:,}",
                 *[_cell(m.get(k), f, org.get(k), change) for k, _, f, change in cols],
                 str(rec.get("info", {}).get("best_step", "–"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lftf_tables(results: dict[str, Any]) -> str:
    """Both tables (rank sweep, then ablations) as Markdown, each under a bold title line."""
    return "\n\n".join(f"**{title}**\n\n{lftf_table(results, name)}"
                       for name, title in (("rank", "Rank sweep (BMI rank 0 = highest BMI)"),
                                           ("ablation", "Ablations (on the BMI rank-0 block)")))
