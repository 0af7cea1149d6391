"""Benchmark datasets: exact split sizes, determinism from the seed, and each dataset rule
checked against the source files (no model needed; runs in seconds)."""

from __future__ import annotations

import ast
import json
import re

import pytest

from bias_lens.benchmarks import EXTRA_SUITES, SUITES, load_split, sample_prompts, split_sizes, to_jsonl
from bias_lens.benchmarks import external, generated, sources
from bias_lens.benchmarks.datasets import check_suite

EXPECTED_SIZES = {
    "genbiaspro-cg": {"train": 1280, "dev": 256, "test": 1024},
    "genbiaseval": {"train": 1026, "dev": 513, "test": 1026},
    "genbiaseval-heldout": {"train": 684, "dev": 342, "test": 342},
    "genhinteval": {"train": 342, "dev": 171, "test": 342},
    "dama": {"train": 1925, "dev": 484, "test": 1111},
    "dama-filtered": {"train": 1199, "dev": 594, "test": 1221},
    "stereoset": {"dev": 83, "test": 253},
    "stereoset-intra": {"dev": 255},
    "stereoset-inter": {"dev": 242},
    "commonwords": {"train": 1200, "dev": 400, "test": 400},
    "crows-pairs": {"test": 262},
    "winogender": {"test": 240},
    "winobias": {"dev": 792, "test": 792},
    "retention": {"test": 1392},  # 1,488 - 256 guard sentences + 160 probe items
    "religion": {"train": 342, "dev": 171, "test": 342},
}


def test_split_sizes_exact():
    assert {s: split_sizes(s) for s in SUITES + EXTRA_SUITES} == EXPECTED_SIZES
    for suite, sizes in EXPECTED_SIZES.items():
        for split, n in sizes.items():
            assert len(load_split(suite, split)) == n


def test_other_axes_sizes():
    assert split_sizes("crows-pairs", axis="religion") == {"test": 105}
    assert split_sizes("crows-pairs", axis="all") == {"test": 1508}
    assert split_sizes("stereoset", axis="race") == {"dev": 371, "test": 962}
    assert split_sizes("stereoset", axis="religion") == {"dev": 12, "test": 79}
    assert split_sizes("stereoset-intra", axis="all") == {"dev": 2106}
    assert split_sizes("stereoset-inter", axis="all") == {"dev": 2123}
    assert {r["bias_type"] for r in load_split("crows-pairs", "test", axis="religion")} == {"religion"}
    with pytest.raises(ValueError, match="only split"):
        load_split("stereoset", "test", axis="profession")
    with pytest.raises(ValueError, match="no bias axis"):
        load_split("genbiaseval", "test", axis="race")


def test_dama_seed_redraws_dev_only():
    a = {sp: to_jsonl(load_split("dama", sp, seed=0)) for sp in ("train", "dev", "test")}
    b = {sp: to_jsonl(load_split("dama", sp, seed=1)) for sp in ("train", "dev", "test")}
    assert a["test"] == b["test"] and a["dev"] != b["dev"]
    assert {sp: to_jsonl(r) for sp, r in generated.build_dama(0).items()} == a


@pytest.mark.parametrize("suite", ["genbiaspro-cg", "genbiaseval", "genhinteval", "dama-filtered", "religion"])
def test_same_seed_byte_identical_other_seed_differs(suite):
    generated_a = {sp: to_jsonl(load_split(suite, sp, seed=0)) for sp in ("train", "dev", "test")}
    fresh = {"genbiaspro-cg": generated.build_genbiaspro_cg, "genbiaseval": generated.build_genbiaseval,
             "genhinteval": generated.build_genhinteval, "dama-filtered": generated.build_dama_filtered,
             "religion": generated.build_religion}[suite](0)
    assert {sp: to_jsonl(rows) for sp, rows in fresh.items()} == generated_a
    other = {sp: to_jsonl(load_split(suite, sp, seed=1)) for sp in ("train", "dev", "test")}
    assert other["test"] != generated_a["test"]
    def keys(parts):
        return sorted((r["profession"], r["template"], r.get("modifier")) for sp in parts
                      for r in map(json.loads, parts[sp].splitlines()))

    assert keys(other) == keys(generated_a)  # same samples, re-drawn splits (and, GenHintEval, hints)


@pytest.mark.parametrize("suite", ["genbiaspro-cg", "genbiaseval", "genhinteval", "dama", "dama-filtered", "religion"])
def test_splits_are_profession_disjoint_and_cover_everything(suite):
    profs = {sp: {r["profession"] for r in load_split(suite, sp)} for sp in ("train", "dev", "test")}
    assert not (profs["train"] & profs["dev"]) and not (profs["train"] & profs["test"]) and not (profs["dev"] & profs["test"])


def test_genbiaspro_cg_structure():
    rows = [r for sp in ("train", "dev", "test") for r in load_split("genbiaspro-cg", sp)]
    assert len(rows) == 2560
    assert len({(r["profession"], r["modifier"]) for r in rows}) == 320 * 8
    assert {r["modifier"] for r in rows} == {
        "pessimistic", "dejected", "optimistic", "enthusiastic", "worse", "worst", "better", "best"}
    by_prof = {}
    for r in rows:
        by_prof.setdefault(r["profession"], set()).add(r["modifier"])
    assert len(by_prof) == 320 and all(len(v) == 8 for v in by_prof.values())
    nurse = next(r for r in rows if r["profession"] == "nurse" and r["modifier"] == "best")
    assert "def find_best_nurses(nurses, gender):" in nurse["prompt"]
    assert nurse["prompt"].endswith("# The best nurse is usually someone whose pronoun is")
    assert nurse["f_he"] == pytest.approx((1 - 0.1) / 2) and nurse["f_she"] == pytest.approx((1 + 0.1) / 2)
    # the two shots are valid Python and show one he and one she completion
    ast.parse(generated.CG_SHOTS)
    assert re.findall(r"pronoun is (\w+)", generated.CG_SHOTS) == ["he", "she"]
    multi = next(r for r in rows if r["profession"] == "adjunct professor" and r["modifier"] == "best")
    assert "def find_best_adjunct_professors(adjunct_professors, gender):" in multi["prompt"]


def test_plural_rules():
    assert [generated.plural(w) for w in ("nurse", "boss", "secretary", "policeman", "adjunct professor", "coach")] == [
        "nurses", "bosses", "secretaries", "policemen", "adjunct professors", "coaches"]


def test_gender_marked_filter_rule():
    kept = {w for w, _, _ in generated.neutral_professions()}
    assert len(kept) == 285
    for dropped in ("actress", "salesman", "businesswoman", "housewife", "waiter", "actor", "nun", "fireman"):
        assert dropped not in kept
    for k in ("nurse", "architect", "carpenter", "secretary", "manager", "hairdresser"):
        assert k in kept
    # the documented alternatives
    assert len(generated.neutral_professions(threshold=1.01)) == 292
    assert len(generated.neutral_professions(threshold=0.25)) == 273


def test_genbiaseval_templates_and_scales():
    rows = [r for sp in ("train", "dev", "test") for r in load_split("genbiaseval", sp)]
    assert len(rows) == 285 * 9
    assert len({r["template"] for r in rows}) == 9
    counts = {s: len({r["template"] for r in rows if r["scale"] == s}) for s in ("word", "phrase", "sentence")}
    assert counts == {"word": 3, "phrase": 3, "sentence": 3}
    assert all(r["prompt"] == r["template"].format(profession=r["profession"]) for r in rows)
    assert all(r["prompt"].startswith("The ") and r["prompt"].endswith(" because") for r in rows)


def test_genbiaseval_heldout_holds_out_templates_and_professions():
    split = {sp: load_split("genbiaseval-heldout", sp) for sp in ("train", "dev", "test")}
    fit = split["train"] + split["dev"]
    seen_t, test_t = {r["template"] for r in fit}, {r["template"] for r in split["test"]}
    assert len(seen_t) == 6 and len(test_t) == 3 and not seen_t & test_t
    # one held-out template per scale, and it is the last action of each scale
    assert sorted(r["scale"] for r in {r["template"]: r for r in split["test"]}.values()) == ["phrase", "sentence", "word"]
    assert {t.removeprefix("The {profession} ").removesuffix(" because") for t in test_t} == set(generated.HELDOUT_ACTIONS)
    assert not {r["profession"] for r in fit} & {r["profession"] for r in split["test"]}
    # the same samples as GenBiasEval's splits, filtered (same professions per split, same order)
    full = {sp: load_split("genbiaseval", sp) for sp in ("train", "dev", "test")}
    assert split["train"] == [r for r in full["train"] if r["template"] in seen_t]
    assert split["test"] == [r for r in full["test"] if r["template"] in test_t]


def test_genhinteval_hints_both_genders():
    rows = [r for sp in ("train", "dev", "test") for r in load_split("genhinteval", sp)]
    assert len(rows) == 285 * 3
    for r in rows:
        assert (r["F"] == 1) == (r["hint"] in ("his", "himself")) and r["F"] in (1, -1)
        assert f" {r['hint']} " in r["prompt"]
    for t in generated.GHE_TEMPLATES:
        Fs = [r["F"] for r in rows if r["template"] == t[0]]
        assert sorted(set(Fs)) == [-1, 1] and abs(sum(Fs)) <= 1


def test_dama_templates_recover_source_prompts():
    templates = generated.dama_templates()
    assert len(templates) == 11 and all(t.count("{}") == 1 for t in templates)
    src = sources.dama_source()
    assert len(src) == 2409
    for row in src:
        assert any(t.format(row["subject"]) == row["prompt"] for t in templates)
    rows = [r for sp in ("train", "dev", "test") for r in load_split("dama-filtered", sp)]
    assert len(rows) == 274 * 11 and all(abs(r["f"]) <= 0.25 for r in rows)
    src_subjects = {r["subject"].removeprefix("The ").removeprefix("the ") for r in src}
    assert src_subjects <= {r["profession"] for r in rows}


def test_dama_split_is_damas_own():
    """DAMA's generate_adapt_data.py: train = its released train professions; test = the |f| <= 0.25
    professions it held out plus every |f| > 0.25 one (46 < the 55 held out, so all of them)."""
    src = {r["subject"].removeprefix("The ") for r in sources.dama_source()}
    profs = {sp: {r["profession"] for r in load_split("dama", sp)} for sp in ("train", "dev", "test")}
    assert profs["train"] | profs["dev"] == src and not profs["train"] & profs["dev"]
    every = {w: f for w, f, _ in sources.professions()}
    held = {w for w, f in every.items() if abs(f) <= 0.25} - src
    factual = {w for w, f in every.items() if abs(f) > 0.25}
    assert (len(held), len(factual)) == (55, 46) and profs["test"] == held | factual
    test = load_split("dama", "test")
    assert len(test) == 101 * 11 and {r["prompt"] for r in test}.isdisjoint(r["prompt"] for r in sources.dama_source())
    assert len(profs["dev"]) == 44  # a seeded fifth of the train professions (DAMA has no dev)


def _official_by_sentence() -> dict[str, dict]:
    """Official dev rows keyed by every one of their (normalised) sentences: the independent oracle."""
    out = {}
    for line in (sources.data_dir() / "stereoset/official_dev.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["type"] == "intrasentence":
            for k in ("stereotype", "anti-stereotype", "unrelated"):
                out.setdefault(" ".join(r[k].lower().split()), []).append((k, r))
    return out


@pytest.mark.parametrize("axis,n", [("gender", 253), ("race", 962), ("religion", 79)])
def test_stereoset_test_labels_are_the_official_ones(axis, n):
    """Every test item's stereotype / anti-stereotype / unrelated sentence carries the label the
    official StereoSet dev set gives that sentence (in a row with the same context)."""
    rows = load_split("stereoset", "test", axis=axis)
    assert len(rows) == n and all(r["label_source"] == "official" for r in rows)
    index = _official_by_sentence()
    for r in rows:
        for ours, theirs in (("stereotype", "stereotype"), ("anti_stereotype", "anti-stereotype"),
                             ("unrelated", "unrelated")):
            hits = index[" ".join(r[ours].lower().split())]
            assert any(lab == theirs and off["context"].lower() == r["prompt"].lower() for lab, off in hits), (r, ours)


def test_stereoset_biasedit_gender_file_is_swapped_race_religion_not():
    """The shipped BiasEdit gender file exchanges the two labels on every item; the loader does not."""
    raw = json.loads((sources.data_dir() / "stereoset/gender_test.json").read_text())
    ours = load_split("stereoset", "test")
    assert [x["data"]["stereotype"]["sentence"] for x in raw] == [r["anti_stereotype"] for r in ours]
    assert [x["data"]["anti-stereotype"]["sentence"] for x in raw] == [r["stereotype"] for r in ours]
    school = next(r for r in ours if r["prompt"] == "The BLANK schoolgirl gave a recital at her school.")
    assert school["stereotype"].startswith("The innnocent") and school["anti_stereotype"].startswith("The angry")
    race = json.loads((sources.data_dir() / "stereoset/race_test.json").read_text())
    gold = [{s["gold_label"]: s["sentence"] for s in x["sentences"]}["stereotype"] for x in race]
    assert gold == [r["stereotype"] for r in load_split("stereoset", "test", axis="race")]


def test_stereoset_official_tasks():
    intra = load_split("stereoset-intra", "dev", axis="all")
    inter = load_split("stereoset-inter", "dev", axis="all")
    assert {r["bias_type"] for r in intra} == {"gender", "race", "religion", "profession"}
    assert sum(r["bias_type"] == "gender" for r in intra) == 255
    assert all("BLANK" in r["prompt"] for r in intra) and not any("BLANK" in r["prompt"] for r in inter)
    with pytest.raises(ValueError, match="no split"):
        load_split("stereoset-intra", "test")


def test_published_sets_match_sources():
    crows = load_split("crows-pairs", "test")
    assert {r["direction"] for r in crows} == {"stereo", "antistereo"} and all(r["bias_type"] == "gender" for r in crows)
    wg = load_split("winogender", "test")
    bls = sources.winogender_bls()
    for r in wg:
        assert r["sentence"].startswith(r["prompt"]) and r["bls_pct_female"] == bls[r["occupation"]]
        rest = r["sentence"][len(r["prompt"]):].split()[0].lower().strip(".,")
        assert rest == r["targets"][0]
    assert len({r["occupation"] for r in wg}) == 60
    wb = load_split("winobias", "test")
    assert {r["type"] for r in wb} == {1, 2} and all(r["pro"] != r["anti"] for r in wb)
    assert all("[" not in r["pro"] for r in wb)


def test_retention_sizes_and_probe_arithmetic():
    sents = external.retention_sentences()
    assert len(sents) >= 1000 and len(set(sents)) == len(sents)
    from bias_lens.benchmarks.capability_data import is_gendered, neutral_sentences

    assert sorted(sents) == sorted(neutral_sentences()) and not any(is_gendered(s) for s in sents)
    words = {w.strip(".,?!;:'\"()").lower() for s in sents for w in s.split()}
    assert not words & {"he", "she", "his", "her", "him", "man", "woman", "mother", "father"}
    probe = sources.retention_probe()
    assert len(probe) >= 150 and len({p["prompt"] for p in probe}) == len(probe)
    arith = [p for p in probe if p["category"] == "arithmetic"]
    assert arith
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
             "eleven", "twelve"]
    for p in arith:  # every arithmetic target is the true result
        expr = p["prompt"].lower().removesuffix("equals").rstrip("= ").replace("plus", "+").replace("minus", "-")
        expr = expr.replace("times", "*").replace("x", "*").replace("×", "*")
        expr = " ".join(str(words.index(t)) if t in words else t for t in expr.split())
        assert re.fullmatch(r"[\d\s+\-*/]+", expr), p
        target = p["target"].strip().lower()
        value = words.index(target) if target in words else int(target)
        assert value == eval(expr), p  # noqa: S307 - digits and operators only
    assert all(p["target"].startswith(" ") for p in probe)


def test_edit_retention_pool_is_disjoint_from_the_measured_corpus():
    """Guards, covariances and causal selection read the first GUARD_SENTENCES sentences; the retention
    suite (every perplexity in the reports) scores only the others."""
    pool = external.retention_texts(external.GUARD_SENTENCES)
    measured = [r["prompt"] for r in load_split("retention", "test") if r["kind"] == "sentence"]
    assert pool == external.retention_sentences()[: external.GUARD_SENTENCES]
    assert not set(pool) & set(measured) and len(pool) + len(measured) == len(external.retention_sentences())
    with pytest.raises(ValueError, match="retention pool"):
        external.retention_texts(external.GUARD_SENTENCES + 1)


def test_sample_prompts_and_bad_input():
    a = sample_prompts("genbiaseval", "train", n=20, seed=3)
    assert a == sample_prompts("genbiaseval", "train", n=20, seed=3) and len(set(a)) == 20
    assert len(sample_prompts("winogender", "test", n=10_000)) == 240
    with pytest.raises(ValueError, match="unknown suite"):
        check_suite("nope")
    with pytest.raises(ValueError, match="no split"):
        load_split("crows-pairs", "train")
    with pytest.raises(ValueError):
        sample_prompts("dama", n=0)


def test_missing_or_malformed_data_file_is_one_clear_error(tmp_path, monkeypatch):
    import shutil

    shutil.copytree(sources.data_dir(), tmp_path / "data")
    monkeypatch.setenv("BIAS_LENS_DATA", str(tmp_path / "data"))
    (tmp_path / "data/stereoset/official_dev.jsonl").write_text('{"type": "intra\n')
    (tmp_path / "data/dama/train_dama.json").unlink()
    for fn, name in ((sources.stereoset_official, "official_dev.jsonl"), (sources.dama_source, "train_dama.json")):
        fn.cache_clear()
        try:
            with pytest.raises(ValueError, match=name) as err:
                fn()
            assert "\n" not in str(err.value) and "restore" in str(err.value)
        finally:
            fn.cache_clear()
