"""bias_lens.labels: exact round trips, one clear error per malformed label, and agreement with the
regexes it replaced (an independent re-implementation of the old grammar kept here as the oracle)."""

from __future__ import annotations

import dataclasses
import random
import re

import pytest
import torch

from bias_lens import arch
from bias_lens.labels import (
    HOOK_KINDS, KINDS, LABEL_TYPES, MODULE_KINDS, EntryLabel, HeadLabel, HookLabel, LayerLabel, ModuleLabel,
    NeuronLabel, RowLabel, ValueNeuronLabel, is_head, is_kind, is_neuron, is_value_neuron, kind_of, parse,
    parse_all, parse_as, try_parse,
)

EXAMPLES = {
    "L12": LayerLabel(12),
    "L0.attn.q": ModuleLabel(0, "attn.q"),
    "L3.mlp.down": ModuleLabel(3, "mlp.down"),
    "L29.mlp.down/row7": RowLabel(29, "mlp.down", 7),
    "L2.attn.o/row0/col31": EntryLabel(2, "attn.o", 0, 31),
    "L12N1021": NeuronLabel(12, 1021),
    "L12H3": HeadLabel(12, 3),
    "L12H3V7": ValueNeuronLabel(12, 3, 7),
    "L3.mlp.post": HookLabel(3, "mlp.post"),
    "L0.resid_pre": HookLabel(0, "resid_pre"),
}

MALFORMED = [
    "", "L", "l3", "3", "L-1", "L+3", "L3N", "LN3", "L3N7x", "xL3N7", "L3n7", "L3.mlp", "L3.", "L3.mlp.",
    "L3.mlp.foo", "L3.MLP.down", "L3.mlp.down.", "L3.attn.q.x", "L3.mlp.down/row", "L3.mlp.down/rowx",
    "L3.mlp.down/row1/col", "L3.mlp.down/col1", "L3.mlp.down/row1/col2/x", "L3.mlp.down/row1/", "L3.mlp.foo/row1",
    "L3.mlp.post/row1", "L3.resid_pre/row1/col2", "L3N7.mlp.down", "L3H2V", "L3H2V1V2", "L3H", "L3HV2", "L3N7H2",
    "L03", "L3N07", "L00H1", "L1.mlp.down/row01", "L1.mlp.down/row1/col007", "L3.mlp.down/row1.5",
    " L3", "L3 ", "L3N7\n", "\tL3", "L\u0663N7", "L３", "L3N7;", "L3 N7", "embed", "bias", "nonsense",
]


def _canonical_strings(rng: random.Random, n: int) -> list[tuple[str, object]]:
    """Random well-formed labels of every kind, with the label object each must parse to."""
    out = []
    for _ in range(n):
        l, a, b, c = (rng.choice([0, 1, 9, 10, 99, 100, rng.randrange(10**6)]) for _ in range(4))
        mod, hook = rng.choice(MODULE_KINDS), rng.choice(HOOK_KINDS)
        out += [
            (f"L{l}", LayerLabel(l)), (f"L{l}.{mod}", ModuleLabel(l, mod)), (f"L{l}.{mod}/row{a}", RowLabel(l, mod, a)),
            (f"L{l}.{mod}/row{a}/col{b}", EntryLabel(l, mod, a, b)), (f"L{l}N{a}", NeuronLabel(l, a)),
            (f"L{l}H{a}", HeadLabel(l, a)), (f"L{l}H{a}V{c}", ValueNeuronLabel(l, a, c)), (f"L{l}.{hook}", HookLabel(l, hook)),
        ]
    return out


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("text", list(EXAMPLES))
def test_parse_and_str_round_trip_on_every_kind(text):
    lab = parse(text)
    assert lab == EXAMPLES[text] and type(lab) is type(EXAMPLES[text])
    assert str(lab) == text
    assert parse(str(lab)) == lab
    assert kind_of(text) == lab.KIND
    assert parse(lab.EXAMPLE).KIND == lab.KIND and str(parse(lab.EXAMPLE)) == lab.EXAMPLE


def test_every_kind_has_an_example_and_a_distinct_name():
    assert {type(v) for v in EXAMPLES.values()} == set(LABEL_TYPES)
    assert len(set(KINDS)) == len(LABEL_TYPES)


def test_round_trip_property_over_many_indices_and_every_module_and_hook_kind():
    rng = random.Random(0)
    cases = _canonical_strings(rng, 400)
    cases += [(f"L{l}.{k}", ModuleLabel(l, k)) for l in range(40) for k in MODULE_KINDS]
    cases += [(f"L{l}.{k}", HookLabel(l, k)) for l in range(40) for k in HOOK_KINDS]
    cases += [(f"L{l}N{n}", NeuronLabel(l, n)) for l in range(12) for n in range(0, 3000, 7)]
    for text, want in cases:
        got = parse(text)
        assert got == want, text
        assert str(got) == text
        assert str(want) == text  # constructing then printing gives the same string


def test_labels_are_frozen_hashable_values():
    lab = NeuronLabel(3, 7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lab.index = 8  # type: ignore[misc]
    assert {NeuronLabel(3, 7), parse("L3N7")} == {lab}
    assert NeuronLabel(3, 7) != HeadLabel(3, 7)  # same numbers, different components
    assert RowLabel(2, "mlp.down", 5).module == ModuleLabel(2, "mlp.down")
    assert EntryLabel(2, "mlp.up", 5, 1).row_label == RowLabel(2, "mlp.up", 5)
    assert ValueNeuronLabel(4, 1, 2).head_label == HeadLabel(4, 1)


@pytest.mark.parametrize("bad", [
    lambda: NeuronLabel(-1, 0), lambda: NeuronLabel(True, 0), lambda: NeuronLabel(1.0, 2), lambda: HeadLabel(1, "2"),
    lambda: ModuleLabel(1, "mlp.foo"), lambda: RowLabel(1, "mlp.post", 0), lambda: EntryLabel(0, "mlp.down", 0, -3),
    lambda: HookLabel(0, "mlp.down"), lambda: LayerLabel(None),
])
def test_constructors_refuse_invalid_fields(bad):
    with pytest.raises(ValueError):
        bad()


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("text", MALFORMED)
def test_every_malformed_label_raises_one_value_error_naming_it(text):
    with pytest.raises(ValueError) as err:
        parse(text)
    msg = str(err.value)
    assert repr(text) in msg
    assert err.value.__cause__ is None and err.value.__context__ is None  # one error, not a chain
    assert try_parse(text) is None
    assert not (is_neuron(text) or is_head(text) or is_value_neuron(text))
    with pytest.raises(ValueError):
        kind_of(text)


def test_error_messages_say_how_to_fix():
    generic = str(pytest.raises(ValueError, parse, "nonsense").value)
    for t in LABEL_TYPES:
        assert t.EXAMPLE in generic and t.KIND in generic
    assert "write 'L3N7'" in str(pytest.raises(ValueError, parse, "L03N07").value)
    assert "write 'L1.mlp.down/row1/col7'" in str(pytest.raises(ValueError, parse, "L1.mlp.down/row01/col007").value)
    assert "write 'L3'" in str(pytest.raises(ValueError, parse, "L3 ").value)
    msg = str(pytest.raises(ValueError, parse, "L3.mlp.foo").value)
    assert "'mlp.foo'" in msg and "mlp.down" in msg and "resid_pre" in msg
    assert "unknown module kind 'mlp.post'" in str(pytest.raises(ValueError, parse, "L3.mlp.post/row1").value)
    assert "got int" in str(pytest.raises(ValueError, parse, 3).value)


def test_parse_as_names_what_was_wanted_and_what_it_got():
    assert parse_as("L3N7", NeuronLabel) == NeuronLabel(3, 7)
    assert parse_as("L3H1", NeuronLabel, HeadLabel) == HeadLabel(3, 1)
    msg = str(pytest.raises(ValueError, parse_as, "L2N3", ValueNeuronLabel).value)
    assert msg.startswith("'L2N3' is not an attention value neuron but a neuron name") and "L12H3V7" in msg
    msg = str(pytest.raises(ValueError, parse_as, "L03H1", HeadLabel).value)
    assert "is not a head name" in msg and "write 'L3H1'" in msg
    msg = str(pytest.raises(ValueError, parse_as, "L1.mlp.bogus", ModuleLabel).value)
    assert "is not a module name" in msg and ", ".join(MODULE_KINDS) in msg
    with pytest.raises(ValueError):
        parse_as("L1")


def test_predicates_and_parse_all_never_raise():
    for text, lab in EXAMPLES.items():
        assert is_neuron(text) == isinstance(lab, NeuronLabel)
        assert is_head(text) == isinstance(lab, HeadLabel)
        assert is_value_neuron(text) == isinstance(lab, ValueNeuronLabel)
        assert is_kind(text, type(lab)) and not is_kind(text, *(t for t in LABEL_TYPES if t is not type(lab)))
    assert parse_all(["L1N2", "L0N0"], NeuronLabel) == [NeuronLabel(1, 2), NeuronLabel(0, 0)]
    assert parse_all(["L1N2", "L0H0"], NeuronLabel) is None
    assert parse_all(["L1N2", "garbage"], NeuronLabel) is None
    assert parse_all([], NeuronLabel) == []


# --------------------------------------------------------------------------- agreement with the old regexes
_OLD = [  # the grammar as arch.py / masks.py / value_neurons.py parsed it before labels.py
    ("layer", re.compile(r"^L(\d+)$")),
    ("rowentry", re.compile(r"^(L\d+)\.((?:attn|mlp)\.[a-z]+)/row(\d+)(?:/col(\d+))?$")),
    ("neuron", re.compile(r"^L(\d+)N(\d+)$")),
    ("head", re.compile(r"^L(\d+)H(\d+)$")),
    ("value_neuron", re.compile(r"^L(\d+)H(\d+)V(\d+)$")),
    ("module", re.compile(r"^L(\d+)\.((?:attn|mlp)\.[a-z]+)$")),
    ("hook", re.compile(r"^L(\d+)\.(resid_pre|resid_mid|resid_post|attn\.out|attn\.z|mlp\.in|mlp\.post|mlp\.out)$")),
]


def _old_parse(text: str):
    for kind, rx in _OLD:
        m = rx.match(text)
        if not m:
            continue
        g = m.groups()
        if kind == "rowentry":
            if g[1] not in MODULE_KINDS:
                continue
            layer = int(g[0][1:])
            return RowLabel(layer, g[1], int(g[2])) if g[3] is None else EntryLabel(layer, g[1], int(g[2]), int(g[3]))
        if kind == "module":
            if g[1] not in MODULE_KINDS:
                continue  # maybe a hook point (the old parsers were tried one after another)
            return ModuleLabel(int(g[0]), g[1])
        if kind == "hook":
            return HookLabel(int(g[0]), g[1])
        cls = {"layer": LayerLabel, "neuron": NeuronLabel, "head": HeadLabel, "value_neuron": ValueNeuronLabel}[kind]
        return cls(*map(int, g))
    return None


def test_agrees_with_the_old_regexes_on_fuzzed_strings():
    """Same result as the old regexes on every string, except that non-canonical numbers (leading
    zeros, non-ASCII digits, a trailing newline) are now refused, so that str(parse(s)) == s always holds."""
    rng = random.Random(1)
    pieces = ["L", "L", "N", "H", "V", ".", "/row", "/col", "mlp", "attn", ".down", ".q", ".o", ".post", "resid_pre",
              "0", "1", "7", "12", "03", "mlp.up", "attn.z", "x", "/"]
    strings = [s for s, _ in _canonical_strings(rng, 100)] + MALFORMED
    strings += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 7))) for _ in range(10000)]
    chars = "0123456789LNHV./rowcl_ pq"
    for base, _ in _canonical_strings(rng, 300):  # one-character mutations of valid labels: near misses
        for _ in range(4):
            i = rng.randrange(len(base) + 1)
            op = rng.randrange(3)
            strings.append(base[:i] + rng.choice(chars) + base[i + (op == 1):] if op < 2 else base[:i] + base[i + 1:])
    seen = set()
    for s in strings:
        new, old = try_parse(s), _old_parse(s) if "\n" not in s else None
        if new is not None:
            seen.add(new.KIND)
            assert old == new, s
            assert str(new) == s
        elif old is not None:
            # the deliberate differences: leading zeros, and non-ASCII digits (old ``\d`` took "L٣N7" as L3N7)
            assert re.search(r"(?<![0-9])0[0-9]", s) or not s.isascii(), s
    assert seen == set(KINDS)  # the fuzz reached every kind


def test_kind_tables_match_arch():
    assert MODULE_KINDS == arch.MODULE_KINDS
    assert HOOK_KINDS == arch.HOOK_KINDS


def test_arch_parsers_keep_their_signatures():
    assert arch.parse_module_name("L2.attn.o") == (2, "attn.o")
    assert arch.parse_neuron_name("L12N1021") == (12, 1021)
    assert arch.parse_head_name("L12H3") == (12, 3)
    assert arch.parse_hook_name("L3.mlp.post") == (3, "mlp.post")
    for fn, bad, noun in [(arch.parse_module_name, "L2.mlp.bogus", "module name"), (arch.parse_neuron_name, "L2H1", "neuron name"),
                          (arch.parse_head_name, "L2N1", "head name"), (arch.parse_hook_name, "L2.mlp.down", "hook point")]:
        with pytest.raises(ValueError, match=f"is not an? {noun}"):
            fn(bad)


# --------------------------------------------------------------------------- consumers dispatch through labels
def test_consumers_refuse_wrong_kinds_before_any_work(tiny_llama):
    from bias_lens.edit.masks import mask_from_labels
    from bias_lens.locate.attribution import component_delta
    from bias_lens.locate.circuit import _node, trace_circuit

    before = {n: p.detach().clone() for n, p in tiny_llama.hf.named_parameters()}
    for bad, what in [("L0.mlp.post", "hook point"), ("L0H1V2", "attention value neuron"), ("L0N07", "leading zeros")]:
        with pytest.raises(ValueError, match=what):
            mask_from_labels(tiny_llama.hf, [bad])
    with pytest.raises(ValueError, match="tracing from a head"):
        trace_circuit(tiny_llama, "L1H0", None)  # refused before it asks for prompts or a cache
    with pytest.raises(ValueError, match="not a neuron name but an attention value neuron"):
        trace_circuit(tiny_llama, "L1H0V1", None)
    with pytest.raises(ValueError, match="not a neuron name or head name"):
        component_delta(tiny_llama, None, "L1.mlp.down")
    assert _node("L2H3") == {"label": "L2H3", "layer": 2, "kind": "head"}
    assert _node("L10N3") == {"label": "L10N3", "layer": 10, "kind": "neuron"}
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.hf.named_parameters())


def test_masks_of_typed_labels_equal_the_hand_built_entries(tiny_llama):
    """Row/entry/neuron/head masks against entries set by hand on the [out, in] views."""
    from bias_lens.edit.masks import mask_from_labels

    hf = tiny_llama.hf
    down = arch.param_ref(hf, "L1.mlp.down")
    m = mask_from_labels(hf, ["L1.mlp.down/row5", "L1.mlp.down/row2/col9"])
    want = torch.zeros(down.weight_view(hf).shape, dtype=torch.bool)
    want[5] = True
    want[2, 9] = True
    assert m.names == [down.weight_name] and torch.equal(m.masks[down.weight_name], want)
    m = mask_from_labels(hf, ["L1N4"])
    assert torch.equal(m.masks[down.weight_name].nonzero()[:, 1].unique(), torch.tensor([4]))
    for kind in ("mlp.gate", "mlp.up"):
        ref = arch.param_ref(hf, f"L1.{kind}")
        assert torch.equal(m.masks[ref.weight_name].nonzero()[:, 0].unique(), torch.tensor([4]))
    n_heads = hf.config.num_attention_heads
    q = arch.param_ref(hf, "L0.attn.q")
    d_head = q.weight_view(hf).shape[0] // n_heads
    m = mask_from_labels(hf, ["L0H1"])
    rows = m.masks[q.weight_name].any(1).nonzero()[:, 0]
    assert torch.equal(rows, torch.arange(d_head, 2 * d_head))


def test_select_neurons_keeps_only_neuron_labels_in_rank_order():
    from bias_lens.edit.neuron_masking import select_neurons
    from bias_lens.locate.result import LocateResult

    res = LocateResult("x", ["L0H1", "L2N3", "L1.mlp.down", "L0H1V2", "L1N0", "L1.mlp.down/row3"],
                       torch.tensor([9.0, 1.0, 8.0, 7.0, 2.0, 6.0]))
    assert select_neurons(res, 5) == ["L1N0", "L2N3"]
    with pytest.raises(ValueError, match="no neuron labels"):
        select_neurons(LocateResult("x", ["L0H1"], torch.tensor([1.0])), 1)


def test_plots_read_typed_labels():
    from bias_lens.locate.result import LocateResult
    from bias_lens.plot.attribution import head_heatmap, neuron_heatmap
    from bias_lens.plot.gradients import entry_heatmap, row_cosine_strip

    fig = head_heatmap(LocateResult("a", ["L1H2", "L0H0"], torch.tensor([0.5, 0.25]), extras={"signed": [0.5, -0.25]}))
    z = fig.data[0].z
    assert z[1][2] == 0.5 and z[0][0] == -0.25 and len(z) == 2 and len(z[0]) == 3
    fig = neuron_heatmap(LocateResult("a", ["L2N5", "L0N1"], torch.tensor([3.0, 4.0])), n_bins=6)
    assert fig.data[0].z[1][5] == 3.0 and fig.data[0].z[0][1] == 4.0 and list(fig.data[0].y) == ["L0", "L2"]
    with pytest.raises(ValueError, match="neuron labels"):
        neuron_heatmap(LocateResult("a", ["L2N5", "L0H1"], torch.tensor([3.0, 4.0])))
    with pytest.raises(ValueError, match="head labels"):
        head_heatmap(LocateResult("a", ["L2H5V1"], torch.tensor([3.0]), extras={"signed": [3.0]}))
    strip = row_cosine_strip(LocateResult("r", ["L3.mlp.down/row4", "L3.mlp.down/row1"], torch.tensor([0.1, 0.2])))
    assert list(strip.data[0].x) == [4, 1]
    with pytest.raises(ValueError, match="row_scale"):
        row_cosine_strip(LocateResult("r", ["L3.mlp.down/row4/col1"], torch.tensor([0.1])))
    fig = entry_heatmap(LocateResult("e", ["L3.mlp.down/row4/col1", "L3.mlp.down/row2/col0"], torch.tensor([5.0, 6.0])))
    assert list(fig.data[0].y) == ["row2", "row4"] and fig.data[0].z[1][1] == 5.0 and fig.data[0].z[0][0] == 6.0
    assert "L3.mlp.down" in fig.layout.title.text


def test_labels_module_is_the_bottom_floor():
    """labels.py imports nothing from the package, so any module (arch included) may import it."""
    import ast
    import bias_lens.labels as mod

    tree = ast.parse(open(mod.__file__, encoding="utf-8").read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"re", "dataclasses", "typing", "__future__"}, imported
