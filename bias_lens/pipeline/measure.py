"""The one measurement of an edited (or unedited) model: the report's columns, from the benchmarks.

``limits`` says which suites to run and on how many test samples (``None`` = all; ``mmlu``
counts questions per subject). Each suite's metrics are renamed into the report's columns by
:data:`COLUMNS`. The bias suites go through the PB prefix when ``prefix`` is given (a
:class:`~bias_lens.edit.measure.PrefixedModel` view); the retention and capability suites never
are (PB changes no weights, so they are unchanged by construction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: GenBiasEval metrics kept: the papers' raw scores, their renormalised companions, the mass
GBE_KEYS = ("afgb", "afgb_renorm", "mass", "fbs", "fbs_renorm", "afgb_word", "afgb_phrase", "afgb_sentence")


@dataclass(frozen=True)
class Column:
    """How one suite feeds the report: suite metric -> column name, and its evaluation options."""

    keys: dict[str, str]
    options: dict[str, Any] = field(default_factory=dict)
    prefixed: bool = True  # bias suites see the PB prefix; retention / capability suites never do
    per_subject: bool = False  # the limit counts questions per subject (MMLU)
    suite: str | None = None  # the benchmark suite when the column key is not one (a StereoSet axis)


COLUMNS: dict[str, Column] = {
    "genbiaseval": Column({k: k for k in GBE_KEYS}),
    # GenBiasEval's 3 held-out templates on its test professions: template-held-out when the edit
    # trained on genbiaseval-heldout (whose train/dev never contain them), profession-held-out always
    "genbiaseval-heldout": Column({"afgb": "afgb_heldout", "afgb_renorm": "afgb_renorm_heldout", "mass": "mass_heldout"}),
    "genhinteval": Column({"ub": "ub", "ub_renorm": "ub_renorm"}),
    # MSME's FBS on code prompts (long prompts: small batches)
    "genbiaspro-cg": Column({"fbs": "fbs_cg", "fbs_renorm": "fbs_cg_renorm", "mass": "mass_cg", "afgb": "afgb_cg",
                             "afgb_renorm": "afgb_cg_renorm"}, {"batch_size": 8}),
    "dama": Column({"a_s": "dama_a_s", "a_f": "dama_a_f", "afgb": "afgb_dama", "afgb_renorm": "afgb_dama_renorm",
                    "mass": "mass_dama"}),
    "stereoset": Column({"ss": "ss", "lms": "lms", "icat": "icat"}),
    # BiasEdit's other test selections (its race and religion editors)
    **{f"stereoset_{axis}": Column({k: f"{k}_{axis}" for k in ("ss", "lms", "icat")}, {"axis": axis}, suite="stereoset")
       for axis in ("race", "religion")},
    "crows-pairs": Column({"crows": "crows"}),
    "retention": Column({"perplexity": "perplexity", "probe_accuracy": "probe_accuracy"}, prefixed=False),
    # MMLU prompt lengths vary 10x, and a batch pads to its longest prompt
    "mmlu": Column({"accuracy": "mmlu"}, {"batch_size": 8}, prefixed=False, per_subject=True),
    "arithmetic": Column({"accuracy": "arithmetic"}, prefixed=False),
}


def measure(lm: Any, limits: dict[str, int | None], *, prefix: str = "", batch_size: int = 32,
            details: bool = False) -> dict[str, Any]:
    """The report's columns for the current weights on the test splits of ``limits``' suites.

    ``details=True`` adds ``_details``: per-prompt ``p_he``/``p_she`` of GenBiasEval (for the
    profession before/after figure)."""
    from ..benchmarks import evaluate
    from ..edit.measure import PrefixedModel

    unknown = sorted(set(limits) - set(COLUMNS))
    if unknown:
        raise ValueError(f"cannot measure {unknown}; measurable suites: {', '.join(COLUMNS)}")
    biased = PrefixedModel(lm, prefix) if prefix else lm
    out: dict[str, Any] = {}
    for suite, limit in limits.items():
        col = COLUMNS[suite]
        kw = {"batch_size": batch_size, **col.options, ("limit_per_subject" if col.per_subject else "limit"): limit}
        r = evaluate(biased if col.prefixed else lm, col.suite or suite, "test", **kw)
        out.update({name: float(r.metrics[k]) for k, name in col.keys.items() if k in r.metrics})
        if details and suite == "genbiaseval":
            out["_details"] = [{"profession": d.get("profession"), "p_he": d["p_he"], "p_she": d["p_she"]}
                               for d in r.details]
    return out
