"""Edit-method variants: one small validated dataclass per method, its defaults defined here once.

A plan (:class:`bias_lens.pipeline.plan.EditPlan`) is *where* (a scale and how many located
labels) plus one of these. Each variant serialises as a dict keyed by ``kind``
(:func:`method_to_dict` / :func:`method_from_dict`), which is what reports, caches and exported
checkpoints record. The function that turns a variant into an :class:`~bias_lens.edit.edits.Edit`
is registered in :data:`bias_lens.pipeline.driver.COMPUTE`; a new method is one dataclass here
plus one function there.

* :class:`Finetune` — masked fine-tuning of the located entries (MSME / LFTF). ``paper`` picks the
  literal loss (``msme``: MSME Eq. 6-8 as written, ``msme_literal``; ``lftf``: LFTF Eq. 5) unless
  ``loss`` names another one of :data:`bias_lens.edit.losses.LOSSES`; ``lr`` ``None`` = the
  scale's learning rate (:data:`bias_lens.edit.finetune.SCALE_LR`). ``hint`` adds the UB anchor
  (docs/edit_hint.md); ``dev_metric`` / ``mass_weight`` / ``mass_floor`` are the equalising
  options (docs/edit.md).
* :class:`FullFinetune` — the FPFT baseline: the same loop over every parameter.
* :class:`Masking` — scale the located entries by ``factor`` (0 = zero them; the attribution scale
  masks the neurons' down-projection columns).
* :class:`Contrastive` — local contrastive editing: stereotypical / anti-stereotypical references
  trained on a CDA corpus and pruned by IMP, the entries where they differ edited by ``mode``/``alpha``.
* :class:`Prompt` — the PB baseline: a debiasing prefix, no weights.
* :class:`Equalise` — the closed-form equalising edit of one located matrix (kernel ridge on the
  linearised he/she log-odds, mass and hinted prompts kept).
* :class:`Dama` — DAMA's orthogonal projection of a learned gender subspace out of the MLP
  outputs of upper-middle layers (no located mask: DAMA chooses its layers).
* :class:`EditorMethod` — BiasEdit: editor networks trained on StereoSet (or loaded), then one
  shift of their matrices from ``n_edits`` train requests of the ``bias`` type (no located mask:
  the editor's matrices are the whole ``mlp.down`` weights of its blocks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar

from .equalise import EqualiseConfig
from .finetune import SCALE_LR, FinetuneConfig
from .imp import ReferenceConfig

if TYPE_CHECKING:
    from .dama import DamaConfig

#: the literal loss of each paper's fine-tuning (MSME Eq. 6-8 as written, LFTF Eq. 5)
PAPER_LOSS = {"msme": "msme_literal", "lftf": "lftf"}


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is not None and v < 1:
            raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {v}")


@dataclass(frozen=True)
class HintAnchor:
    """The UB anchor on GenHintEval train prompts and its dev-UB guard (docs/edit_hint.md)."""

    weight: float = 1.0
    loss: str = "ub_drop"
    ub_tolerance: float | None = 0.05  # early stopping rejects states whose dev UB fell more than this
    dev_limit: int = 64

    def __post_init__(self) -> None:
        from .losses import get_hint_loss

        get_hint_loss(self.loss)
        if not self.weight > 0:
            raise ValueError(f"hint-weight must be > 0 with hint-anchor, got {self.weight}")
        if self.ub_tolerance is not None and self.ub_tolerance < 0:
            raise ValueError(f"ub-tolerance must be >= 0, got {self.ub_tolerance}")
        _positive(self, "dev_limit")


@dataclass(frozen=True)
class Finetune:
    """Masked fine-tuning (MSME / LFTF) of the located entries; ``None`` = the paper/scale default."""

    kind: ClassVar[str] = "finetune"
    paper: str = "msme"
    loss: str | None = None
    lr: float | None = None
    epochs: int = 2
    max_steps: int | None = None
    eval_every: int | None = None  # steps between dev/retention checks (None: once per epoch)
    patience: int = 2
    batch_size: int = 32
    dev_limit: int = 128
    retention_limit: int = 48
    retention_threshold: float = 0.05
    hint: HintAnchor | None = None
    dev_metric: str = "afgb"
    mass_weight: float = 0.0
    mass_floor: float | None = None

    def __post_init__(self) -> None:
        if self.paper not in PAPER_LOSS:
            raise ValueError(f"paper must be one of {', '.join(PAPER_LOSS)}, got {self.paper!r}")
        _positive(self, "epochs", "max_steps", "eval_every", "patience", "batch_size", "dev_limit")
        if self.retention_limit < 0:
            raise ValueError("retention-limit must be >= 0")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self.config("module", 0)  # the loop's own checks (loss name, dev metric, mass options)

    @property
    def name(self) -> str:
        """The method name used in records and reports (the paper's name)."""
        return self.paper

    def config(self, scale: str | None, seed: int) -> FinetuneConfig:
        """The :class:`~bias_lens.edit.finetune.FinetuneConfig` of this variant at ``scale``."""
        scale = scale if scale in SCALE_LR else "all"
        over: dict[str, Any] = {
            "loss": self.loss or self.default_loss, "seed": seed, "epochs": self.epochs, "batch_size": self.batch_size,
            "dev_limit": self.dev_limit, "retention_limit": self.retention_limit, "max_steps": self.max_steps,
            "retention_threshold": self.retention_threshold, "eval_every": self.eval_every, "patience": self.patience,
            "dev_metric": self.dev_metric, "mass_weight": self.mass_weight, "mass_floor": self.mass_floor}
        if self.lr is not None:
            over["lr"] = self.lr
        if self.hint is not None:
            over.update(hint_weight=self.hint.weight, hint_loss=self.hint.loss, ub_tolerance=self.hint.ub_tolerance,
                        hint_dev_limit=self.hint.dev_limit)
        return FinetuneConfig.for_scale(scale, **over)

    @property
    def default_loss(self) -> str:
        """The loss the variant's paper uses (:data:`PAPER_LOSS`)."""
        return PAPER_LOSS[self.paper]


@dataclass(frozen=True)
class FullFinetune(Finetune):
    """FPFT: the fine-tuning loop over every parameter (lr: ``SCALE_LR["all"]``)."""

    kind: ClassVar[str] = "fpft"

    @property
    def name(self) -> str:
        """The method name used in records and reports (``fpft``)."""
        return "fpft"

    def config(self, scale: str | None, seed: int) -> FinetuneConfig:
        """The fine-tuning config at scale ``all`` whatever ``scale`` is (every parameter is trained)."""
        return super().config("all", seed)


@dataclass(frozen=True)
class Masking:
    """Scale the located entries by ``factor`` (attribution scale: the neurons' down columns)."""

    kind: ClassVar[str] = "mask"
    factor: float = 0.0
    name: ClassVar[str] = "mask"


@dataclass(frozen=True)
class Contrastive:
    """Local contrastive editing (Lutz et al. 2024; :mod:`bias_lens.edit.contrastive`, docs/contrastive.md).

    Stereotypical and anti-stereotypical references trained on the CDA corpus and pruned by IMP
    (``training``; loaded from ``reference_dir`` when given), the weights where their subnetworks
    differ (``localisation``: ``mask_diff`` or the ``k`` largest ``value_diff``; ``k`` None = the
    mask-difference size), then the target's entries moved by ``mode``/``alpha`` toward the
    ``reference`` side (``transfer``: by the update from the other side, ``θ + α (r − s)``; else
    ``θ + α (r − θ)``). ``control``: the same number of random entries per matrix, edited the same
    way. The search space is every block weight matrix (the localisation is the method's own: no
    located mask)."""

    kind: ClassVar[str] = "contrastive"
    name: ClassVar[str] = "contrastive"
    mode: str = "interpolate"
    alpha: float = 1.0
    localisation: str = "mask_diff"
    k: int | None = None
    reference: str = "anti"
    transfer: bool = True
    control: bool = False
    reference_dir: str | None = None
    training: ReferenceConfig = field(default_factory=ReferenceConfig)

    def __post_init__(self) -> None:
        from .contrastive import LOCALISATIONS, check_alpha
        from .references import SIDES

        if isinstance(self.training, dict):
            object.__setattr__(self, "training", ReferenceConfig(**self.training))
        _positive(self, "k")
        check_alpha(self.mode, self.alpha)
        if self.localisation not in LOCALISATIONS:
            raise ValueError(f"localisation must be one of {', '.join(LOCALISATIONS)}, got {self.localisation!r}")
        if self.reference not in SIDES:
            raise ValueError(f"reference must be one of {', '.join(SIDES)}, got {self.reference!r}")
        if self.k is not None and self.localisation == "mask_diff":
            raise ValueError("k sets the value_diff size; mask_diff edits every entry where the masks differ")

    @property
    def source(self) -> str | None:
        """The side the transferred update starts from (``stereo``, or ``anti`` for a stereo reference)."""
        if not self.transfer:
            return None
        return "anti" if self.reference == "stereo" else "stereo"

    @property
    def sides(self) -> tuple[str, ...]:
        """The references this variant needs trained."""
        return tuple(dict.fromkeys(("stereo", "anti", self.reference)))


@dataclass(frozen=True)
class Prompt:
    """PB: a debiasing instruction prepended to every bias prompt; no weights change."""

    kind: ClassVar[str] = "prompt"
    name: ClassVar[str] = "prompt"
    prefix: str | None = None  # None: bias_lens.edit.baselines.PB_PREFIX

    @property
    def text(self) -> str:
        """The debiasing prefix: ``prefix`` when given, else :data:`~bias_lens.edit.baselines.PB_PREFIX`."""
        from .baselines import PB_PREFIX

        return self.prefix if self.prefix is not None else PB_PREFIX


@dataclass(frozen=True)
class Dama:
    """DAMA's projection edit (:mod:`bias_lens.edit.dama`): the gender subspace, learned on the
    ``train_suite``'s train prompts, projected out of the MLP outputs of ``n_layers`` upper-middle
    layers. ``None`` defaults scale with the model as the reference's released LLaMA-7B run script
    (``run_adapt_model_7B.sh``: ``--null_dim 128 --num_layers 11``) does: ``null_dim = d_model // 32``
    and ``n_layers = round(11 / 32 x layers)``, ending two layers below the top (docs/dama.md; the
    example config's 1024 of 4096 and 9 layers is ``Dama(null_dim=d_model // 4, ...)``)."""

    kind: ClassVar[str] = "dama"
    name: ClassVar[str] = "dama"
    null_dim: int | None = None
    n_layers: int | None = None
    update: str = "iterative"
    steps: int = 20
    max_requests: int | None = None  # train prompts used (None: the whole train split)
    train_suite: str = "dama"

    def __post_init__(self) -> None:
        from .dama import UPDATES

        _positive(self, "null_dim", "n_layers", "steps")
        if self.update not in UPDATES:
            raise ValueError(f"dama update must be one of {', '.join(UPDATES)}, got {self.update!r}")
        if self.max_requests is not None and self.max_requests < 2:
            raise ValueError(f"max-requests must be >= 2, got {self.max_requests}")

    def config(self, d_model: int, n_model_layers: int, seed: int) -> DamaConfig:
        """The :class:`~bias_lens.edit.dama.DamaConfig` of this variant on a model of that shape."""
        from .dama import DamaConfig

        return DamaConfig(null_dim=self.null_dim or max(1, d_model // 32),
                          n_layers=self.n_layers or max(1, round(11 / 32 * n_model_layers)), update=self.update,
                          steps=self.steps, max_requests=self.max_requests, seed=seed)


@dataclass(frozen=True)
class Equalise:
    """The closed-form equalising edit of the located weight matrix (:mod:`bias_lens.edit.equalise`):
    kernel ridge on the linearised he/she log-odds of the train prompts, keeping their pronoun mass
    and the hinted prompts' log-odds (docs/equalise.md). One matrix: scales module, row or neuron."""

    kind: ClassVar[str] = "equalise"
    name: ClassVar[str] = "equalise"
    # defaults are EqualiseConfig's (defined once there)
    gamma: float = EqualiseConfig.gamma
    ridge: float | None = EqualiseConfig.ridge
    penalty: str = EqualiseConfig.penalty
    cov_reg: float = EqualiseConfig.cov_reg
    keep_mass: bool = EqualiseConfig.keep_mass
    keep_hint: bool = EqualiseConfig.keep_hint
    n_iter: int | None = EqualiseConfig.n_iter
    retention_limit: int = EqualiseConfig.retention_limit

    def __post_init__(self) -> None:
        self.config()

    def config(self) -> EqualiseConfig:
        """The :class:`~bias_lens.edit.equalise.EqualiseConfig` of this variant."""
        return EqualiseConfig(gamma=self.gamma, ridge=self.ridge, penalty=self.penalty, cov_reg=self.cov_reg,
                              keep_mass=self.keep_mass,
                              keep_hint=self.keep_hint, n_iter=self.n_iter, retention_limit=self.retention_limit)


#: the bias types an editor edits (StereoSet's intrasentence types with a BiasEdit test selection)
EDITOR_BIASES = ("gender", "race", "religion")


@dataclass(frozen=True)
class EditorMethod:
    """BiasEdit (:mod:`bias_lens.edit.editor`): train editors on the StereoSet train split (early
    stopping on its dev split; every bias type, as the reference) or load them from ``editor_dir``,
    then edit once from ``n_edits`` seeded train requests of ``bias``. ``layers``: the blocks whose
    ``mlp.down`` the editors shift (``None``: the top ``top``). Training options left ``None`` take
    :class:`~bias_lens.edit.editor.EditorConfig`'s defaults (defined once there)."""

    kind: ClassVar[str] = "editor"
    name: ClassVar[str] = "biasedit"
    bias: str = "gender"
    layers: tuple[int, ...] | None = None
    top: int | None = None
    n_edits: int | None = None
    lr: float | None = None
    meta_lr: float | None = None
    loc_coef: float | None = None
    epochs: int | None = None
    max_minutes: float | None = None
    loss: str | None = None  # mean_prob_kl (the reference's, literal) | pair_kl
    retention: str | None = None  # mean_prob_kl (the reference's, literal) | token_kl
    editor_dir: str | None = None
    shift_scale: float = 1.0  # multiplies the predicted shift (1 = the reference; the trade-off sweep's knob)

    def __post_init__(self) -> None:
        if not self.shift_scale > 0:
            raise ValueError(f"shift-scale must be > 0, got {self.shift_scale}")
        if self.bias not in EDITOR_BIASES:
            raise ValueError(f"bias must be one of {', '.join(EDITOR_BIASES)}, got {self.bias!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
            if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
                raise ValueError(f"editor layers must be distinct block indices >= 0, got {list(self.layers)}")
        self.config()

    def overrides(self) -> dict[str, Any]:
        """The :class:`~bias_lens.edit.editor.EditorConfig` fields this variant sets."""
        keys = ("top", "n_edits", "lr", "meta_lr", "loc_coef", "epochs", "max_minutes", "loss", "retention")
        over = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        if self.layers is not None:
            over["modules"] = tuple(f"L{layer}.mlp.down" for layer in sorted(self.layers))
        return over

    def config(self, seed: int = 0) -> Any:
        """The editor training config of this variant (``seed``: the plan's)."""
        from .editor import EditorConfig

        return EditorConfig(**self.overrides(), seed=seed)


Method = Finetune | FullFinetune | Masking | Contrastive | Prompt | Dama | Equalise | EditorMethod
#: every variant by its ``kind`` (the JSON key)
VARIANTS: dict[str, type] = {c.kind: c for c in (Finetune, FullFinetune, Masking, Contrastive, Prompt, Dama, Equalise,
                                                 EditorMethod)}
#: methods whose edit does not use a located mask
MASKLESS = ("fpft", "prompt", "dama", "editor", "contrastive")


def method_to_dict(m: Any) -> dict[str, Any]:
    """``{"kind": ..., **fields}`` (nested variants as dicts)."""
    return {"kind": m.kind, **asdict(m)}


def method_from_dict(d: dict[str, Any]) -> Any:
    """The variant of ``d["kind"]`` (unknown kinds and fields are one clear ValueError)."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in VARIANTS:
        raise ValueError(f"unknown edit method kind {kind!r}; choose one of {', '.join(VARIANTS)}")
    cls = VARIANTS[kind]
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown options {unknown} for edit method {kind!r}; known: {', '.join(sorted(names))}")
    if d.get("hint") is not None:
        d["hint"] = HintAnchor(**d["hint"])
    if isinstance(d.get("layers"), list):
        d["layers"] = tuple(d["layers"])
    return cls(**d)


def with_training(m: Any, **overrides: Any) -> Any:
    """``m`` with fine-tuning fields replaced (the variant itself, or a contrastive reference)."""
    if isinstance(m, Finetune):
        return replace(m, **overrides)
    if isinstance(m, Contrastive) and overrides.get("max_steps") is not None:  # caps the reference training
        cap, t = overrides["max_steps"], m.training
        return replace(m, training=replace(t, steps=min(t.steps, cap), retrain_steps=min(t.retrain_steps, cap)))
    return m
