"""Prefix replay (bias_lens.prefix_cache): an edited model measured with the unedited blocks replayed
gives exactly the numbers of the plain measurement, on every tiny architecture.

Oracles: ``measure`` of the same edited model without any cache (``==``, not approximately);
the replay really skips the early blocks (their forward is never called for a recorded batch);
an unseen batch runs every block; edits outside the blocks (embedding) replay nothing.
"""

from __future__ import annotations

import pytest
import torch

from bias_lens.edit.edits import Edit
from bias_lens.edit.masks import mask_from_labels
from bias_lens.pipeline.measure import measure
from bias_lens.prefix_cache import PrefixCache, checkpoints, first_edited_layer, record, replay, replaying

#: genbiaspro-cg scores its 2-shot prompts after a KV cache of their shared prefix (scoring.prefix_cache):
#: the call that builds that cache must run every block, or the suffix batches read a cache that lacks
#: the skipped blocks (it did, and GenBiasPro-CG FBS of every replayed row read 1.000)
LIMITS = {"genbiaseval": 12, "genhinteval": 8, "genbiaspro-cg": 8, "dama": 8, "stereoset": 6, "crows-pairs": 6,
          "retention": 6, "arithmetic": 8}


def _edit(lm, label: str, seed: int = 0) -> Edit:
    mask = mask_from_labels(lm.hf, [label])
    g = torch.Generator().manual_seed(seed)
    return Edit.from_fn(lm, mask, lambda name, old: old + 0.5 * torch.randn(old.shape, generator=g).to(old),
                        method="test")


def test_replayed_measurement_equals_the_plain_one(tiny):
    # GPT-2's learned positions (128 here) are shorter than the 2-shot CG prompts; rotary models run them
    limits = LIMITS if tiny.hf.config.model_type != "gpt2" else {k: v for k, v in LIMITS.items() if k != "genbiaspro-cg"}
    pc = PrefixCache((1, 2))
    with record(tiny, pc):
        before = measure(tiny, limits, batch_size=4)
    assert before == measure(tiny, limits, batch_size=4)  # recording changes nothing
    for label, want in (("L2.mlp.down", 2), ("L1.attn.o", 1)):
        edit = _edit(tiny, label)
        with edit.applied(tiny.hf):
            plain = measure(tiny, limits, batch_size=4)
            hits = pc.hits
            with replaying(tiny, pc, edit.indices) as block:
                got = measure(tiny, limits, batch_size=4)
        assert block == want and pc.hits > hits
        assert got == plain and got != before


def test_replay_skips_the_early_blocks_and_runs_unseen_batches(tiny_llama):
    lm = tiny_llama
    pc = PrefixCache((2,))
    prompts = {"genbiaseval": 8}
    with record(lm, pc):
        measure(lm, prompts, batch_size=4)
    calls = []
    hooks = [lm.layers[i].register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i in range(3)]
    try:
        with replay(lm, pc, 2):
            measure(lm, prompts, batch_size=4)
            assert set(calls) == {2}  # blocks 0 and 1 never ran
            calls.clear()
            measure(lm, {"genbiaseval": 9}, batch_size=3)  # other batches: not recorded
            assert set(calls) == {0, 1, 2} and pc.misses > 0
    finally:
        for h in hooks:
            h.remove()
    assert all(type(b).__name__ != "_Skip" for b in lm.layers)  # restored


def test_first_edited_layer_and_checkpoints(tiny_llama):
    lm = tiny_llama
    names = list(mask_from_labels(lm.hf, ["L2.mlp.down", "L1.attn.q"]).names)
    assert first_edited_layer(lm, names) == 1
    assert first_edited_layer(lm, [*names, lm.arch.embed + ".weight"]) is None
    assert checkpoints(30) == (10, 14, 18, 22, 24, 26, 28, 29) and checkpoints(3) == (1, 2) and checkpoints(1) == ()
    pc = PrefixCache((1, 2))
    assert pc.best_layer(2) is None  # nothing recorded yet
    pc.store = {1: {b"k": torch.zeros(1)}, 2: {b"k": torch.zeros(1)}}
    assert pc.best_layer(2) == 2 and pc.best_layer(1) == 1 and pc.best_layer(0) is None and pc.best_layer(None) is None
    with pytest.raises(ValueError, match=">= 1"):
        PrefixCache((0,))
    with pytest.raises(ValueError, match="no inputs of block 2"), replay(lm, PrefixCache((2,)), 2):
        pass
    with pytest.raises(ValueError, match="do not exist"), record(lm, PrefixCache((7,))):
        pass


def test_equalise_relinearisation_replay_is_exact(tiny, monkeypatch):
    """``equalise_edit`` with ``n_iter > 1`` replays the blocks before the edited matrix on its later
    linearisations: the edit equals the one computed with every block run each time (disabled)."""
    from bias_lens.benchmarks import load_split
    from bias_lens.edit import equalise
    from bias_lens.edit.equalise import EqualiseConfig, equalise_edit

    train = load_split("genbiaseval", "train")[:12]
    hint = load_split("genhinteval", "train")[:6]
    mask = mask_from_labels(tiny.hf, ["L2.mlp.down"])
    cfg = EqualiseConfig(n_iter=2, ridge=0.1, retention_limit=4, batch_size=4)
    calls = []
    real_replay = equalise.replay
    monkeypatch.setattr(equalise, "replay", lambda *a: calls.append(a[2]) or real_replay(*a))
    fast = equalise_edit(tiny, mask, train, hint=hint, config=cfg)
    assert calls == [2]
    monkeypatch.setattr(equalise, "first_edited_layer", lambda lm, names: None)
    slow = equalise_edit(tiny, mask, train, hint=hint, config=cfg)
    assert calls == [2]
    for name in fast.indices:
        assert torch.equal(fast.values[name], slow.values[name])
