"""Typed component labels: the one parser for the strings that name layers, modules, neurons, heads.

Every locate method names what it scored with a label string, and every mask, plot and circuit
reads those strings back. This module is the single place that grammar lives:

==============  =================================  ==========================
kind            string form                        type
==============  =================================  ==========================
layer           ``L{l}``                           :class:`LayerLabel`
module          ``L{l}.attn.q|k|v|o``,             :class:`ModuleLabel`
                ``L{l}.mlp.gate|up|down``
row             ``L{l}.{module}/row{r}``           :class:`RowLabel`
entry           ``L{l}.{module}/row{r}/col{c}``    :class:`EntryLabel`
neuron          ``L{l}N{n}`` (FFN neuron)          :class:`NeuronLabel`
head            ``L{l}H{h}``                       :class:`HeadLabel`
value_neuron    ``L{l}H{h}V{v}`` (attention value  :class:`ValueNeuronLabel`
                neuron: dim v of head h's value)
hook            ``L{l}.resid_pre|resid_mid|...``   :class:`HookLabel`
==============  =================================  ==========================

The string stays the user-facing and JSON form; the types are for dispatch
(``isinstance(parse(s), NeuronLabel)``) instead of regexes and substring tests. ``str(parse(s)) == s``
for every accepted ``s``: numbers are plain ASCII decimals without leading zeros (``L03`` is refused
with a hint to write ``L3``), so two spellings never name the same component.

This module is the bottom floor of the package: it imports nothing from bias_lens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import ClassVar, Iterable, Union, dataclass_transform  # only re/dataclasses/typing allowed here

MODULE_KINDS: tuple[str, ...] = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
HOOK_KINDS: tuple[str, ...] = (
    "resid_pre", "resid_mid", "resid_post", "attn.out", "attn.z", "mlp.in", "mlp.post", "mlp.out",
)


class LabelError(ValueError):
    """A malformed label. ``reason`` is the specific problem, or None when no form matched at all."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


def _check_index(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LabelError(f"{owner}.{name} must be an int >= 0, got {value!r}")


class _Label:
    """Shared behaviour: non-negative int fields, choice fields, ``KIND``, ``FORM``, ``EXAMPLE`` and ``str`` per class.

    The per-class values are set by :func:`_label`; ``_INTS`` are the fields annotated ``int``,
    ``_CHOICES`` maps a string field to its allowed values, ``_TEXT`` is the ``str`` template.
    """

    KIND: ClassVar[str]
    NOUN: ClassVar[str]
    FORM: ClassVar[str]
    EXAMPLE: ClassVar[str]
    _INTS: ClassVar[tuple[str, ...]]
    _CHOICES: ClassVar[dict[str, tuple[str, ...]]]
    _TEXT: ClassVar[str]

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in self._INTS:
            _check_index(owner, name, getattr(self, name))
        for name, choices in self._CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise LabelError(f"{owner}.{name} must be one of {', '.join(choices)}, got {value!r}")

    def __str__(self) -> str:
        return self._TEXT.format_map(self.__dict__)


@dataclass_transform(frozen_default=True)
def _label(kind: str, noun: str, form: str, example: str, text: str, /, **choices: tuple[str, ...]):
    """Class decorator: a frozen dataclass with the class values of one label kind.

    ``text`` is the ``str`` template over the field names; ``choices`` names the string fields
    restricted to a table (``kind=MODULE_KINDS``).
    """
    def wrap(cls: type) -> type:
        cls = dataclass(frozen=True)(cls)
        cls.KIND, cls.NOUN, cls.FORM, cls.EXAMPLE, cls._TEXT = kind, noun, form, example, text
        cls._INTS = tuple(f.name for f in fields(cls) if f.type in ("int", int))
        cls._CHOICES = choices
        return cls
    return wrap


@_label("layer", "layer label", "L{layer}", "L12", "L{layer}")
class LayerLabel(_Label):
    """A whole transformer block ``L{layer}``."""

    layer: int


@_label("module", "module name", "L{layer}.{kind} with kind one of " + ", ".join(MODULE_KINDS), "L12.mlp.down",
        "L{layer}.{kind}", kind=MODULE_KINDS)
class ModuleLabel(_Label):
    """One weight matrix ``L{layer}.{kind}`` (``kind`` in :data:`MODULE_KINDS`)."""

    layer: int
    kind: str


class _InModule:
    """``.module``: the weight matrix a row or entry label lies in."""

    @property
    def module(self) -> ModuleLabel:
        return ModuleLabel(self.layer, self.kind)  # type: ignore[attr-defined]


@_label("row", "row label", "L{layer}.{kind}/row{r}", "L3.mlp.down/row7", "L{layer}.{kind}/row{row}", kind=MODULE_KINDS)
class RowLabel(_InModule, _Label):
    """Row ``row`` of a module's ``[out, in]`` weight: ``L{layer}.{kind}/row{row}``."""

    layer: int
    kind: str
    row: int


@_label("entry", "entry label", "L{layer}.{kind}/row{r}/col{c}", "L3.mlp.down/row7/col3",
        "L{layer}.{kind}/row{row}/col{col}", kind=MODULE_KINDS)
class EntryLabel(_InModule, _Label):
    """One weight entry ``[row, col]`` (``[out, in]`` orientation): ``L{layer}.{kind}/row{r}/col{c}``."""

    layer: int
    kind: str
    row: int
    col: int

    @property
    def row_label(self) -> RowLabel:
        """The row label this entry lies in (``L{layer}.{kind}/row{row}``)."""
        return RowLabel(self.layer, self.kind, self.row)


@_label("neuron", "neuron name", "L{layer}N{index}", "L12N1021", "L{layer}N{index}")
class NeuronLabel(_Label):
    """FFN neuron ``index`` of layer ``layer`` (an input of the down projection): ``L{layer}N{index}``."""

    layer: int
    index: int


@_label("head", "head name", "L{layer}H{head}", "L12H3", "L{layer}H{head}")
class HeadLabel(_Label):
    """Attention head ``head`` of layer ``layer``: ``L{layer}H{head}``."""

    layer: int
    head: int


@_label("value_neuron", "attention value neuron", "L{layer}H{head}V{dim}", "L12H3V7", "L{layer}H{head}V{dim}")
class ValueNeuronLabel(_Label):
    """Attention value neuron: dimension ``dim`` of head ``head``'s value vector, ``L{layer}H{head}V{dim}``."""

    layer: int
    head: int
    dim: int

    @property
    def head_label(self) -> HeadLabel:
        """The head label this value neuron belongs to (``L{layer}H{head}``)."""
        return HeadLabel(self.layer, self.head)


@_label("hook", "hook point", "L{layer}.{point} with point one of " + ", ".join(HOOK_KINDS), "L3.mlp.post",
        "L{layer}.{point}", point=HOOK_KINDS)
class HookLabel(_Label):
    """A hook point (an activation, not a parameter): ``L{layer}.{point}`` with ``point`` in :data:`HOOK_KINDS`."""

    layer: int
    point: str


Label = Union[LayerLabel, ModuleLabel, RowLabel, EntryLabel, NeuronLabel, HeadLabel, ValueNeuronLabel, HookLabel]
LABEL_TYPES: tuple[type, ...] = (
    LayerLabel, ModuleLabel, RowLabel, EntryLabel, NeuronLabel, HeadLabel, ValueNeuronLabel, HookLabel,
)
KINDS: tuple[str, ...] = tuple(t.KIND for t in LABEL_TYPES)

# --------------------------------------------------------------------------- parsing
_N = r"([0-9]+)"
_NAME = r"([a-z_]+(?:\.[a-z_]+)?)"
_FORMS: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p, re.ASCII), k) for p, k in (
    (rf"L{_N}", "layer"),
    (rf"L{_N}N{_N}", "neuron"),
    (rf"L{_N}H{_N}", "head"),
    (rf"L{_N}H{_N}V{_N}", "value_neuron"),
    (rf"L{_N}\.{_NAME}", "module_or_hook"),
    (rf"L{_N}\.{_NAME}/row{_N}", "row"),
    (rf"L{_N}\.{_NAME}/row{_N}/col{_N}", "entry"),
))


def accepted_forms() -> str:
    """One line per label kind (used in every parse error)."""
    return "; ".join(f"{t.FORM} ({t.KIND}, e.g. {t.EXAMPLE})" for t in LABEL_TYPES)


def _int(label: str, digits: str) -> int:
    if len(digits) > 1 and digits[0] == "0":
        fixed = re.sub(r"(?<![0-9])0+(?=[0-9])", "", label)
        reason = f"numbers in labels are written without leading zeros; write {fixed!r}"
        raise LabelError(f"{label!r}: {reason}", reason)
    return int(digits)


def _parse(label: str) -> Label:
    if not isinstance(label, str):
        reason = f"expected a label string, got {type(label).__name__}"
        raise LabelError(f"{reason} {label!r}", reason)
    if label != label.strip():
        reason = f"it has surrounding whitespace; write {label.strip()!r}"
        raise LabelError(f"{label!r}: {reason}", reason)
    for pattern, kind in _FORMS:
        m = pattern.fullmatch(label)
        if m is None:
            continue
        g = m.groups()
        if kind == "layer":
            return LayerLabel(_int(label, g[0]))
        if kind == "neuron":
            return NeuronLabel(_int(label, g[0]), _int(label, g[1]))
        if kind == "head":
            return HeadLabel(_int(label, g[0]), _int(label, g[1]))
        if kind == "value_neuron":
            return ValueNeuronLabel(_int(label, g[0]), _int(label, g[1]), _int(label, g[2]))
        layer, name = _int(label, g[0]), g[1]
        if kind == "module_or_hook":
            if name in MODULE_KINDS:
                return ModuleLabel(layer, name)
            if name in HOOK_KINDS:
                return HookLabel(layer, name)
            reason = (f"unknown module kind or hook point {name!r}; modules: {', '.join(MODULE_KINDS)}; "
                      f"hook points: {', '.join(HOOK_KINDS)}")
            raise LabelError(f"{label!r}: {reason}", reason)
        if name not in MODULE_KINDS:
            reason = f"unknown module kind {name!r}; use one of {', '.join(MODULE_KINDS)}"
            raise LabelError(f"{label!r}: {reason}", reason)
        if kind == "row":
            return RowLabel(layer, name, _int(label, g[2]))
        return EntryLabel(layer, name, _int(label, g[2]), _int(label, g[3]))
    raise LabelError(f"{label!r} is not a component label; accepted forms: {accepted_forms()}")


def parse(label: str) -> Label:
    """The typed label for ``label``, or one ValueError naming the label and the accepted forms."""
    return _parse(label)


def try_parse(label: str) -> Label | None:
    """:func:`parse`, but ``None`` instead of an error (for filtering mixed label lists)."""
    try:
        return _parse(label)
    except LabelError:
        return None


def parse_all(labels: Iterable[str], *types: type) -> list | None:
    """Every label parsed, or None when any label is malformed or not one of ``types``.

    For consumers that need a homogeneous list (a neuron heatmap needs only neuron labels).
    """
    parsed = [try_parse(lab) for lab in labels]
    return parsed if all(p is not None and isinstance(p, types) for p in parsed) else None


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def parse_as(label: str, *types: type) -> Label:
    """:func:`parse` restricted to ``types``: a ValueError says what was wanted, and what ``label`` is.

    >>> parse_as("L3N7", NeuronLabel)
    NeuronLabel(layer=3, index=7)
    """
    if not types:
        raise ValueError("parse_as needs at least one label type")
    wanted = " or ".join(t.NOUN for t in types)
    how = "; ".join(f"use {t.FORM}, e.g. {t.EXAMPLE}" for t in types)
    try:
        lab = _parse(label)
    except LabelError as err:
        why = f" ({err.reason})" if err.reason else ""
        raise LabelError(f"{label!r} is not {_article(wanted)} {wanted}; {how}{why}", err.reason) from None
    if not isinstance(lab, types):
        raise LabelError(f"{label!r} is not {_article(wanted)} {wanted} but {_article(lab.NOUN)} {lab.NOUN}; {how}")
    return lab


def kind_of(label: str) -> str:
    """The kind name of ``label`` (one of :data:`KINDS`); raises like :func:`parse`."""
    return _parse(label).KIND


def is_kind(label: str, *types: type) -> bool:
    """True when ``label`` parses to one of ``types`` (malformed labels give False, never an error)."""
    lab = try_parse(label)
    return lab is not None and isinstance(lab, types)


def is_neuron(label: str) -> bool:
    """True for an FFN neuron label ``L{l}N{n}``."""
    return is_kind(label, NeuronLabel)


def is_head(label: str) -> bool:
    """True for a head label ``L{l}H{h}``."""
    return is_kind(label, HeadLabel)


def is_value_neuron(label: str) -> bool:
    """True for an attention value neuron label ``L{l}H{h}V{v}``."""
    return is_kind(label, ValueNeuronLabel)
