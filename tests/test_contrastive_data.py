"""The CDA corpus of the contrastive references (bias_lens.benchmarks.cda) and the IMP machinery
(bias_lens.edit.imp): swaps against hand-written examples and WinoBias's own anti-stereotyped
sentences, no test item in the corpus, magnitude masks and the training loss against hand
computations and plain transformers."""

from __future__ import annotations

import copy

import pytest
import torch

from bias_lens.benchmarks import cda
from bias_lens.edit.imp import ReferenceConfig, global_keep, iterative_pruning, lm_loss, train_lm_
from bias_lens.edit.references import weight_names


# --------------------------------------------------------------------------- CDA swaps
@pytest.mark.parametrize("text, swapped", [
    ("He gave her book to him.", "She gave his book to her."),
    ("The king asked her to thank his wife.", "The queen asked him to thank her husband."),
    ("SHE said her brother helped her.", "HE said his sister helped him."),
    ("My father is a very masculine kind of man.", "My mother is a very masculine kind of woman."),
    ("The nurse and the tailor met Mr. Smith.", "The nurse and the tailor met Mrs. Smith."),  # occupations stay
    ("Herself, not himself; hers.", "Himself, not herself; hers."),
])
def test_cda_swap_hand_examples(text, swapped):
    assert cda.cda_swap(text) == swapped
    assert cda.has_gender_word(text)


def test_swap_table_priority_and_exclusions():
    t = cda.swap_table()
    assert t["guy"] == "gal"  # debiaswe definitional pairs win over WinoBias's directional "guy girl"
    assert t["priests"] == "nuns" and t["actor"] == "actress" and t["she"] == "he"
    assert "her" not in t and "tailor" not in t and "nurse" not in t  # "her" by rule; occupations never swapped
    assert not cda.has_gender_word("The engineer fixed the machine.")


def test_cda_of_winobias_pro_is_its_anti_sentence():
    """WinoBias writes each anti-stereotyped dev sentence as the pronoun swap of the pro one: the
    swap reproduces >= 95% of them exactly (the rest: object 'her' before a noun phrase, typos)."""
    from bias_lens.benchmarks import sources

    same = total = 0
    for t in (1, 2):
        for (_, pro, _), (_, anti, _) in zip(sources.winobias_lines("pro", t, "dev"), sources.winobias_lines("anti", t, "dev")):
            same += cda.cda_swap(pro) == anti
            total += 1
    assert total == 792 and same / total >= 0.95


# --------------------------------------------------------------------------- the corpus
@pytest.fixture(scope="module")
def corpus():
    return cda.build_corpus(0)


def test_corpus_has_no_test_item_and_splits_by_group(corpus):
    pairs = corpus["train"] + corpus["dev"]
    assert cda.leaks(pairs) == []
    assert not {p.group for p in corpus["train"]} & {p.group for p in corpus["dev"]}
    assert {p.source for p in corpus["train"]} == set(cda.SOURCES)
    assert all(p.anti == cda.cda_swap(p.stereo) and p.anti != p.stereo for p in pairs)
    # professions: GenBiasEval-heldout train professions x its 6 seen templates, stereotype pronoun first
    from bias_lens.benchmarks import load_split

    train_prof = {s["profession"] for s in load_split("genbiaseval-heldout", "train")}
    prof = [p for p in pairs if p.source == "professions"]
    assert prof and all(p.group.split(":", 1)[1] in train_prof for p in prof)
    s_of = {s["prompt"]: s["s"] for s in load_split("genbiaseval-heldout", "train")}
    for p in prof[:50]:
        prompt = next(k for k in s_of if p.stereo.startswith(k + " "))
        assert p.stereo[len(prompt) + 1:].split()[0] in (("he", "his") if s_of[prompt] > 0 else ("she", "her"))
    assert cda.texts(pairs[:3], "neutral") == [t for p in pairs[:3] for t in (p.stereo, p.anti)]


def test_leak_check_catches_planted_test_items():
    from bias_lens.benchmarks import load_split

    crows = load_split("crows-pairs", "test")[0]["sent_less"]
    gbe = load_split("genbiaseval", "test")[0]["prompt"] + " she was tired."
    wino = load_split("winobias", "test")[5]["anti"]
    planted = [cda.CdaPair(crows, "x", "t", "a"), cda.CdaPair("y", gbe.upper(), "t", "b"), cda.CdaPair(wino, "z", "t", "c")]
    assert cda.leaks(planted) == [crows, gbe.upper(), wino]
    with pytest.raises(ValueError, match="unknown CDA sources"):
        cda.build_corpus(0, ("crows",))


# --------------------------------------------------------------------------- magnitude masks
def test_global_keep_matches_hand_computation():
    w = {"a": torch.tensor([[0.1, -3.0], [2.0, 0.5]]), "b": torch.tensor([0.3, -0.05, 4.0])}
    full = {n: torch.ones_like(t, dtype=torch.bool) for n, t in w.items()}
    # 7 entries, rate 3/7 -> the 3 smallest |w| over both tensors: -0.05 (b1), 0.1 (a00), 0.3 (b0)
    k = global_keep(w, full, 3 / 7)
    assert torch.equal(k["a"], torch.tensor([[False, True], [True, True]]))
    assert torch.equal(k["b"], torch.tensor([False, False, True]))
    # a second round prunes round(0.5 * 4 kept) = 2 of the survivors: 0.5 (a11), 2.0 (a10); pruned stay pruned
    k2 = global_keep(w, k, 0.5)
    assert torch.equal(k2["a"], torch.tensor([[False, True], [False, False]])) and torch.equal(k2["b"], k["b"])
    # per tensor: half of each (a: 2 of 4, b: round(1.5) = 2 of 3)
    kt = global_keep(w, full, 0.5, scope="tensor")
    assert torch.equal(kt["a"], torch.tensor([[False, True], [True, False]]))
    assert torch.equal(kt["b"], torch.tensor([False, False, True]))


def test_lm_loss_equals_transformers_labels_loss(tiny_llama):
    lm = tiny_llama
    texts = ["The nurse said that she was late .", "The baker went home ."]
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    ref = lm.hf(**enc, labels=labels).loss
    torch.testing.assert_close(lm_loss(lm.hf, lm.tokenizer, texts, 64), ref, rtol=1e-5, atol=1e-6)


def test_train_lm_keeps_pruned_entries_at_zero_and_touches_only_names(tiny_llama):
    lm = tiny_llama
    names = weight_names(lm)[:3]
    before = {n: p.detach().clone() for n, p in lm.hf.named_parameters()}
    keep = {n: torch.rand(before[n].shape, generator=torch.Generator().manual_seed(1)) > 0.5 for n in names}
    with torch.no_grad():
        for n in names:
            dict(lm.hf.named_parameters())[n].mul_(keep[n])
    cfg = ReferenceConfig(steps=3, lr=1e-2, batch_size=2)
    losses = train_lm_(lm.hf, lm.tokenizer, ["The nurse laughed because she was happy ."] * 4, names, cfg, 3, keep)
    after = dict(lm.hf.named_parameters())
    assert len(losses) == 3
    for n in names:
        assert (after[n][~keep[n]] == 0).all() and not torch.equal(after[n][keep[n]], before[n][keep[n]])
    assert all(torch.equal(after[n], before[n]) for n in before if n not in names)
    assert all(p.requires_grad for p in lm.hf.parameters())  # flags restored


def test_imp_masks_and_rewind_match_a_hand_rerun(tiny_llama):
    """rounds=1, retrain 0: the mask is global_keep of the weights after the same seeded training,
    and 'base' rewinding leaves exactly base x mask; sparsity 1 - (1 - rate) ** rounds."""
    lm = tiny_llama
    names = weight_names(lm)
    texts = [f"The {p} laughed because he was happy ." for p in ("nurse", "baker", "doctor")]
    cfg = ReferenceConfig(steps=2, lr=1e-2, batch_size=2, rounds=1, rate=0.3, retrain_steps=0)
    base = {n: p.detach().clone() for n, p in lm.hf.named_parameters() if n in names}
    m1, m2 = copy.deepcopy(lm.hf), copy.deepcopy(lm.hf)
    keep, hist = iterative_pruning(m1, lm.tokenizer, texts, names, cfg, base)
    train_lm_(m2, lm.tokenizer, texts, names, cfg, cfg.steps)
    p2 = dict(m2.named_parameters())
    hand = global_keep({n: p2[n] for n in names}, {n: torch.ones_like(p2[n], dtype=torch.bool) for n in names}, 0.3)
    p1 = dict(m1.named_parameters())
    for n in names:
        assert torch.equal(keep[n], hand[n]) and torch.equal(p1[n], base[n] * keep[n])
    total = sum(k.numel() for k in keep.values())
    assert sum(int(k.sum()) for k in keep.values()) == total - round(0.3 * total)
    assert hist["rounds"][0]["kept"] == total - round(0.3 * total)
    assert ReferenceConfig(rounds=3, rate=0.2).sparsity == pytest.approx(1 - 0.8 ** 3)


@pytest.mark.parametrize("bad, needle", [({"rate": 1.0}, "pruning rate"), ({"rewind": "init"}, "rewind"),
                                         ({"steps": 0}, "steps must be >= 1"), ({"lr": 0}, "lr must be > 0"),
                                         ({"layers": [-1]}, "block indices"), ({"sources": ["crows"]}, "unknown CDA sources")])
def test_reference_config_rejects_bad_values(bad, needle):
    with pytest.raises(ValueError, match=needle):
        ReferenceConfig(**bad)


def test_balance_equalises_male_and_female_stereotypes_per_source():
    assert cda.gender_of("He told her that his wife was late.") == 0  # he, his vs her, wife
    assert cda.gender_of("He said his son was late.") == 1 and cda.gender_of("Her aunt smiled.") == -1
    raw = cda.build_corpus(0, balanced=False)
    bal = cda.build_corpus(0)
    for source in (s for s in cda.SOURCES if s not in cda.SHARED):
        pairs = [p for p in bal["train"] + bal["dev"] if p.source == source]
        g = [cda.gender_of(p.stereo) for p in pairs]
        assert g.count(1) == g.count(-1) > 0
        before = [cda.gender_of(p.stereo) for p in raw["train"] + raw["dev"] if p.source == source]
        assert g.count(0) == before.count(0) and g.count(1) == min(before.count(1), before.count(-1))
    assert {p.stereo for p in bal["train"]} <= {p.stereo for p in raw["train"] + raw["dev"]}


def test_hint_anchor_is_hint_consistent_and_shared_by_every_side(corpus):
    """GenHintEval-train sentences: the pronoun after the prompt agrees with its hint on both sides,
    and every side trains on the sentence and its swap (no stereotype, no side difference)."""
    from bias_lens.benchmarks import load_split

    hints = [p for p in corpus["train"] + corpus["dev"] if p.source == "hints"]
    train = {s["prompt"]: s for s in load_split("genhinteval", "train")}
    assert len(hints) == len(train)
    for p in hints:
        for text in (p.stereo, p.anti):
            prompt = text[: text.index(",", text.index(",") + 1) + 1]  # up to the template's last comma
            pron = text[len(prompt) + 1:].split()[0]
            hint = next(w for w in ("himself", "herself", "his", "her") if f" {w} " in prompt)
            assert pron == ("he" if hint in ("his", "himself") else "she"), text
        assert cda.texts([p], "stereo") == cda.texts([p], "anti") == [p.stereo, p.anti]
    assert p.stereo[: p.stereo.index(",")] in {k[: k.index(",")] for k in train}


def test_default_references_use_the_measured_sources_and_hints_stay_opt_in():
    """The library's default references are the configuration docs/contrastive.md measured (no
    ``hints`` anchor); the anchor is a named opt-in source, and ``None`` means every source."""
    from bias_lens.edit.imp import ReferenceConfig

    assert ReferenceConfig().sources == cda.DEFAULT_SOURCES == ("professions", "winobias", "stereoset")
    assert "hints" in cda.SOURCES and "hints" not in cda.DEFAULT_SOURCES
    assert ReferenceConfig(sources=cda.SOURCES).sources == cda.SOURCES
    assert ReferenceConfig(sources=None).sources is None
