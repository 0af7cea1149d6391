"""Edit plans: *where* to edit (a locate scale and how many of its labels) and *how* (one method).

``bias-lens edit`` builds one :class:`EditPlan` from its flags; the main job's report rows are
:class:`EditPlan` s too (:mod:`bias_lens.pipeline.config`); both run through
:func:`bias_lens.pipeline.driver.apply_plan`. ``to_dict`` / ``from_dict`` round-trip a plan through
JSON (the method keyed by its ``kind``, see :mod:`bias_lens.edit.methods`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..edit.methods import MASKLESS, Finetune, Masking, method_from_dict, method_to_dict, with_training
from ..locate.gradients import ORDERS

SCALES = ("layer", "module", "row", "neuron", "attribution")
#: which located labels a plan edits: the top ``k`` (the located edit) or, as its controls, the
#: ``k`` from the middle of the ranking (LFTF's rank sweep), the ``k`` lowest-ranked or ``k`` seeded
#: random ones of the same ranking (same size, same method)
PICKS = ("top", "middle", "lowest", "random")
#: how the located scales nest: ``flat`` (the all-layer FFN-down module scan, rows/entries of its top
#: module, top-``k`` of each) or ``msme`` (MSME Eq. 2 -> 3 -> 4 -> 5, each inside the previous)
NESTINGS = ("flat", "msme")
#: the scales ``nesting="msme"`` nests inside the located layer(s)
NESTED_SCALES = ("module", "row", "neuron")
#: Default number of located labels per scale (a block, a module, rows, entries, FFN neurons).
DEFAULT_K = {"layer": 1, "module": 1, "row": 4, "neuron": 4096, "attribution": 8}
#: how the attribution scale picks neurons: the top attribution FFN neurons (``attribution``) or the
#: interpretable-neuron-editing paper's pipeline (``paper``: 150 candidates -> <start> filter -> causal
#: selection, :func:`bias_lens.locate.neuron_pipeline.paper_selection`; masking only)
SELECTIONS = ("attribution", "paper")
#: the paper pipeline's causal rule (:data:`bias_lens.locate.causal.MODES`) and its default set size
CAUSAL_MODES = ("independent", "greedy", "joint")
PAPER_K = 50
#: the most train prompts a plan locates on (a seeded sample when it trains on more: the module scan
#: and the gradient scores cost a pass per prompt, and 256 rank as well as the whole split)
N_LOCATE = 256
#: suites with real-world gender shares per prompt (what the fine-tuning losses need)
PROFESSION_SUITES = ("genbiaseval", "genbiaseval-heldout", "genbiaspro-cg", "dama")


@dataclass(frozen=True)
class Where:
    """The located weights: the top ``k`` labels of the ``scale``'s locate result.

    ``neuron_params`` (attribution scale): ``"all"`` trains each neuron's down column and gate/up
    rows, ``"down"`` only its down column (masking always uses the down column). ``drop``: LFTF's
    ablation, remove the attention (``"attention"``) or MLP (``"mlp"``) tensors from the mask.
    ``general_filter`` (attribution scale, CLI locate): drop general neurons before ranking.

    ``nesting`` (module/row/neuron scales): ``"flat"`` ranks the all-layer FFN-down module scan and
    edits the top ``k`` labels of the scale; ``"msme"`` nests the scales as MSME writes them: the
    ``n_layers`` top blocks of the layer score (Eq. 2), the module scan over every weight matrix of
    those blocks (Eq. 3; the top ``k`` modules are the module edit), the ``row_keep`` fraction of the
    top module's rows (Eq. 4; the row edit updates all of them, so ``k`` is refused) and the Eq. 5
    entries inside those rows (the neuron edit updates the whole entry set). ``row_order``: Eq. 4's
    ranking (``"descending"`` as written, ``"ascending"``), row and neuron scales.

    ``pick`` (flat nesting): ``"top"`` edits the ``k`` best-ranked labels of the scale (the located
    edit); ``"middle"`` (from rank ``n // 2`` on), ``"lowest"`` and ``"random"`` (seeded by the plan's
    seed) are its controls, the same-size edit at the middle, the lowest-ranked or at random places
    of the same ranking: blocks (layer), modules (module), rows and entries of the located module
    (row, neuron).

    ``selection`` (attribution scale): ``"attribution"`` takes the top ``k`` (8) attribution FFN
    neurons; ``"paper"`` runs the interpretable-neuron-editing pipeline (50 FFN value + 50 attention
    value + 50 FFN query candidates -> ``<start>`` filter -> causal selection of up to ``k`` (50) on
    dev prompts by ``causal_mode``: the paper's ``"independent"``, ``"greedy"``, or ``"joint"``, the
    set that lowers the renormalised gap with the pronoun mass kept, :mod:`bias_lens.locate.causal_joint`)."""

    scale: str
    k: int | None = None
    neuron_params: str = "all"
    drop: str | None = None
    general_filter: bool = True
    nesting: str = "flat"
    n_layers: int = 1
    row_keep: float = 0.5
    row_order: str = "descending"
    pick: str = "top"
    selection: str = "attribution"
    causal_mode: str = "independent"

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"unknown scale {self.scale!r}; choose one of {', '.join(SCALES)}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.neuron_params not in ("all", "down"):
            raise ValueError(f"neuron-params must be 'all' or 'down', got {self.neuron_params!r}")
        if self.drop not in (None, "attention", "mlp"):
            raise ValueError(f"drop must be 'attention' or 'mlp', got {self.drop!r}")
        if self.pick not in PICKS:
            raise ValueError(f"pick must be one of {', '.join(PICKS)}, got {self.pick!r}")
        if self.pick != "top" and (self.nesting != "flat" or self.scale == "attribution"):
            raise ValueError("pick 'middle' / 'lowest' / 'random' controls a flat ranking; use nesting 'flat' "
                             "(attribution's random control: locate.neuron_pipeline.matched_random)")
        self._check_nesting()
        self._check_selection()

    def _check_selection(self) -> None:
        """``selection`` / ``causal_mode``: known values, at the attribution scale only."""
        if self.selection not in SELECTIONS:
            raise ValueError(f"neuron selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.causal_mode not in CAUSAL_MODES:
            raise ValueError(f"causal mode must be one of {', '.join(CAUSAL_MODES)}, got {self.causal_mode!r}")
        if self.selection != "attribution" and self.scale != "attribution":
            raise ValueError(f"neuron selection {self.selection!r} picks neurons at the attribution scale, not {self.scale}")
        if self.causal_mode != "independent" and self.selection != "paper":
            raise ValueError("causal mode applies to the paper's neuron selection; pass neuron selection 'paper'")

    def _check_nesting(self) -> None:
        """The nesting fields: known values, and only where they change the located weights."""
        if self.nesting not in NESTINGS:
            raise ValueError(f"nesting must be one of {', '.join(NESTINGS)}, got {self.nesting!r}")
        if self.row_order not in ORDERS:
            raise ValueError(f"row-order must be one of {', '.join(ORDERS)}, got {self.row_order!r}")
        if not 0 < self.row_keep <= 1:
            raise ValueError(f"row-keep must be a fraction in (0, 1], got {self.row_keep}")
        if self.n_layers < 1:
            raise ValueError(f"n-layers must be >= 1, got {self.n_layers}")
        msme = self.nesting == "msme"
        if msme and self.scale not in NESTED_SCALES:
            raise ValueError(f"nesting 'msme' nests the {', '.join(NESTED_SCALES)} scales inside the located layer(s); "
                             f"the {self.scale} scale has no nesting (use nesting 'flat')")
        if msme and self.scale in ("row", "neuron") and self.k is not None:
            raise ValueError(f"nesting 'msme' edits every kept row / the whole entry set at the {self.scale} scale; "
                             "set row-keep instead of k")
        if not msme and self.n_layers != 1:
            raise ValueError("n-layers counts the located layers of nesting 'msme'; pass nesting 'msme' or drop it")
        rows_used = self.scale == "neuron" or (self.scale == "row" and msme)
        if (self.row_keep != 0.5 and not rows_used) or (self.row_order != "descending" and self.scale not in ("row", "neuron")):
            raise ValueError(f"row-keep / row-order change nothing at the {self.scale} scale with nesting "
                             f"{self.nesting!r} (row-order: row and neuron scales; row-keep: neuron, and row with 'msme')")

    @property
    def k_eff(self) -> int:
        """``k``, or the scale's default number of located labels when not given."""
        if self.k is not None:
            return self.k
        return PAPER_K if self.selection == "paper" else DEFAULT_K[self.scale]


@dataclass(frozen=True)
class EditPlan:
    """One edit: ``method`` (a variant of :mod:`bias_lens.edit.methods`) at ``where``, trained on
    ``n_samples`` seeded samples of ``suite``'s train split (``None``: all of it), early-stopped on
    its dev split; located on at most :data:`N_LOCATE` of them."""

    method: Any
    where: Where | None = None
    suite: str = "genbiaseval"
    n_samples: int | None = 256
    seed: int = 0
    name: str | None = None

    def __post_init__(self) -> None:
        kind = self.method.kind
        if self.where is None and kind not in MASKLESS:
            raise ValueError(f"method {self.method.name!r} needs --scale ({'|'.join(SCALES)})")
        if self.where is not None and kind in MASKLESS:
            raise ValueError(f"method {self.method.name!r} edits no located weights; drop --scale")
        if self.suite not in PROFESSION_SUITES:
            raise ValueError(f"editing needs a profession suite with real-world shares: {', '.join(PROFESSION_SUITES)}")
        if self.n_samples is not None and self.n_samples < 1:
            raise ValueError(f"n-samples must be >= 1, got {self.n_samples}")
        if self.where is not None and self.where.selection == "paper" and kind != "mask":
            raise ValueError("the paper's neuron selection picks FFN and attention value neurons to mask; "
                             "use method 'mask' (or neuron selection 'attribution' to fine-tune)")
        if self.where is not None and self.where.nesting == "msme" and kind == "equalise":
            raise ValueError("the equalise edit solves for one FFN down projection (docs/equalise.md); "
                             "use nesting 'flat'")

    @property
    def scale(self) -> str | None:
        """The located scale, or None for maskless methods."""
        return self.where.scale if self.where is not None else None

    @property
    def label(self) -> str:
        """The row name: ``name`` or ``"<method> (<scale>)"``."""
        return self.name or (f"{self.method.name} ({self.scale})" if self.scale else self.method.name)

    @property
    def down_only(self) -> bool:
        """Attribution neurons: edit only their down-projection columns."""
        return isinstance(self.method, Masking) or (self.where is not None and self.where.neuron_params == "down")

    def training(self, **overrides: Any) -> "EditPlan":
        """This plan with fine-tuning fields replaced (methods without training are unchanged)."""
        return replace(self, method=with_training(self.method, **overrides))

    def to_dict(self) -> dict[str, Any]:
        """The plan as a JSON-ready dict (recorded with each row)."""
        return {"name": self.label, "method": method_to_dict(self.method),
                "where": None if self.where is None else {**self.where.__dict__},
                "suite": self.suite, "n_samples": self.n_samples, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditPlan":
        """The plan of :meth:`to_dict`'s output."""
        where = d.get("where")
        return cls(method_from_dict(d["method"]), Where(**where) if where else None, d.get("suite", "genbiaseval"),
                   d.get("n_samples", 256), d.get("seed", 0), d.get("name"))


def layer_result_name(plan: EditPlan) -> str:
    """The locate result that ranks a layer-scale plan's blocks: ``"bmi"`` for LFTF (its Eq. 4 picks
    the block to fine-tune), ``"layer"`` (MSME Eq. 2) for every other method."""
    return "bmi" if plan.scale == "layer" and getattr(plan.method, "paper", None) == "lftf" else "layer"


def finetune_plan(paper: str, scale: str, name: str | None = None, where: dict[str, Any] | None = None,
                  **kw: Any) -> EditPlan:
    """Shorthand for the report rows: ``Finetune(paper=..., **kw)`` at ``Where(scale, **where)``."""
    return EditPlan(Finetune(paper=paper, **kw), Where(scale, **(where or {})), name=name)
