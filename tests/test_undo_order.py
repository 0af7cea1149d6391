"""Undo order of applied edits: every undo either restores exactly what it should or refuses unchanged.

Oracles, independent of ``EditHandle``: the expected weights after any sequence of undos are the
base snapshot with the still-applied edits replayed in apply order by plain tensor assignment;
whether an undo must be refused is computed from the edits' index sets (a later, still-applied
edit writes one of the same entries). Every apply order x every undo order of two and three
overlapping edits, and of non-overlapping edits (which must undo in any order), on each tiny
architecture.
"""

from __future__ import annotations

import copy
import gc
from itertools import permutations

import pytest
import torch

from bias_lens.edit import Edit, mask_from_labels
from bias_lens.edit.edits import _LOG, UndoOrderError

OVERLAP_3 = (  # every pair shares entries (L1.mlp.down row 2/4, L0.mlp.up row 0)
    ["L1.mlp.down/row2", "L1.mlp.down/row4"],
    ["L1.mlp.down/row4", "L0.mlp.up/row0"],
    ["L1.mlp.down/row2/col1", "L0.mlp.up/row0/col3", "L2.attn.q/row0"],
)
CHAIN_3 = (  # A and B overlap, B and C overlap, A and C are disjoint
    ["L1.mlp.down/row1"],
    ["L1.mlp.down/row1/col2", "L1.mlp.down/row6/col0"],
    ["L1.mlp.down/row6"],
)
DISJOINT_3 = (  # disjoint entries, two of them in the same tensor
    ["L1.mlp.down/row2", "L0.mlp.up/row0"],
    ["L1.mlp.down/row4"],
    ["L2.attn.q", "L0.mlp.up/row1"],  # a whole tensor
)
FULL_2 = (  # a whole-tensor edit (logged compactly) overlapping a row edit
    ["L1.mlp.down", "L0.mlp.up/row1"],
    ["L1.mlp.down/row3", "L0.mlp.up/row0"],
)
FNS = (lambda _n, o: o + 1.0, lambda _n, o: o - 7.0, lambda _n, o: o * 3.0 + 0.5)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def bits_equal(model, snap) -> bool:
    return all(torch.equal(p.detach().view(torch.int32), snap[n].view(torch.int32))
               for n, p in model.named_parameters())


def make_edits(hf, groups) -> list[Edit]:
    return [Edit.from_fn(hf, mask_from_labels(hf, labels), FNS[k], method=f"e{k}") for k, labels in enumerate(groups)]


def expected(base, edits: list[Edit], live: list[int]) -> dict[str, torch.Tensor]:
    """Base weights with the edits at positions ``live`` (apply order) written by plain assignment."""
    out = {n: t.clone() for n, t in base.items()}
    for k in live:
        for n, idx in edits[k].indices.items():
            out[n].view(-1)[idx] = edits[k].values[n]
    return out


def overlaps(a: Edit, b: Edit) -> bool:
    return any(set(a.indices[n].tolist()) & set(b.indices[n].tolist()) for n in a.indices if n in b.indices)


def run_scenario(hf, base, edits: list[Edit], undo_order: tuple[int, ...]) -> int:
    """Apply ``edits`` in list order, try undos in ``undo_order``; returns the number refused."""
    handles = [e.apply_(hf) for e in edits]
    assert bits_equal(hf, expected(base, edits, list(range(len(edits)))))
    live, refused = list(range(len(edits))), 0
    for j in undo_order:
        before = snapshot(hf)
        must_refuse = any(k > j and overlaps(edits[j], edits[k]) for k in live)
        if must_refuse:
            with pytest.raises(UndoOrderError, match="undo it first"):
                handles[j].undo()
            assert bits_equal(hf, before) and not handles[j].undone  # refusal changed nothing
            refused += 1
        else:
            handles[j].undo()
            live.remove(j)
            assert bits_equal(hf, expected(base, edits, live)), (undo_order, j)
    for j in sorted(live, reverse=True):  # the right order always works after any refusals
        handles[j].undo()
    assert bits_equal(hf, base)
    return refused


@pytest.mark.parametrize("groups", [OVERLAP_3, CHAIN_3], ids=["all-pairs", "chain"])
def test_three_overlapping_edits_every_apply_and_undo_order(tiny, groups):
    hf = tiny.hf
    base = snapshot(hf)
    edits = make_edits(hf, groups)
    for apply_order in permutations(range(3)):
        ordered = [edits[k] for k in apply_order]
        for undo_order in permutations(range(3)):
            refused = run_scenario(hf, base, ordered, undo_order)
            if undo_order == (2, 1, 0):
                assert refused == 0  # reverse order of applying never refuses
    assert bits_equal(hf, base)


def test_two_overlapping_edits_every_order_and_the_reported_case(tiny):
    hf = tiny.hf
    base = snapshot(hf)
    for groups in (OVERLAP_3[:2], FULL_2):
        for apply_order in permutations(make_edits(hf, groups)):
            for undo_order in permutations(range(2)):
                assert run_scenario(hf, base, list(apply_order), undo_order) == (undo_order == (0, 1))
    a, b = make_edits(hf, OVERLAP_3[:2])
    # the case: undo in the order applied -> refused, naming the shared tensor; nothing changed
    ha, hb = a.apply_(hf), b.apply_(hf)
    edited = snapshot(hf)
    down = next(n for n in a.indices if n in b.indices)
    with pytest.raises(UndoOrderError, match=rf"'e1'.*{down.replace('.', '[.]')}"):
        ha.undo()
    assert bits_equal(hf, edited)
    hb.undo()
    ha.undo()
    assert bits_equal(hf, base)


def test_non_overlapping_edits_undo_in_any_order(tiny):
    hf = tiny.hf
    base = snapshot(hf)
    edits = make_edits(hf, DISJOINT_3)
    assert not any(overlaps(x, y) for x in edits for y in edits if x is not y)
    for apply_order in permutations(range(3)):
        for undo_order in permutations(range(3)):
            assert run_scenario(hf, base, [edits[k] for k in apply_order], undo_order) == 0


def test_discarded_later_handle_blocks_undo_and_log_dies_with_model(tiny_llama):
    hf = copy.deepcopy(tiny_llama.hf)
    base = snapshot(hf)
    a, b = make_edits(hf, OVERLAP_3[:2])
    ha = a.apply_(hf)
    b.apply_(hf)  # handle discarded: b is permanent
    gc.collect()
    edited = snapshot(hf)
    with pytest.raises(UndoOrderError, match="discarded"):
        ha.undo()
    assert bits_equal(hf, edited)
    c = make_edits(hf, DISJOINT_3[2:])[0]  # disjoint from a: fine
    hc = c.apply_(hf)
    hc.undo()
    assert bits_equal(hf, edited) and not bits_equal(hf, base)
    keys = {id(p) for p in hf.parameters()}
    assert keys & set(_LOG)
    del hf, ha, a, b, c, hc
    gc.collect()
    assert not keys & set(_LOG)  # the log is freed with the parameters


def test_nested_applied_contexts_restore_and_double_undo_still_refused(tiny_llama):
    hf = tiny_llama.hf
    base = snapshot(hf)
    a, b = make_edits(hf, OVERLAP_3[:2])
    with a.applied(hf):
        with b.applied(hf) as hb:
            assert bits_equal(hf, expected(base, [a, b], [0, 1]))
        assert hb.undone and bits_equal(hf, expected(base, [a, b], [0]))
    assert bits_equal(hf, base)
    h = a.apply_(hf)
    h.undo()
    with pytest.raises(RuntimeError, match="already undone"):
        h.undo()
