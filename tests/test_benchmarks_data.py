"""Benchmark datasets: exact split sizes, determinism from the seed, and each dataset rule
checked against the source files (no model needed; runs in seconds)."""

from __future__ import annotations

import ast
import json
import re

import pytest

from bias_lens.benchmarks import ALL_SUITES, load_split, sample_prompts, split_sizes, to_jsonl
from bias_lens.benchmarks import external, generated, sources
from bias_lens.benchmarks.datasets import check_suite

EXPECTED_SIZES = {
    "genbiaspro-cg": {"train": 1280, "dev": 256, "test": 1024},
    "genbiaseval": {"train": 1026, "dev": 513, "test": 1026},
    "genhinteval": {"train": 342, "dev": 171, "test": 342},
    "dama": {"train": 1199, "dev": 594, "test": 1221},
    "stereoset": {"dev": 83, "test": 253},
    "crows-pairs": {"test": 262},
    "winogender": {"test": 240},
    "winobias": {"dev": 792, "test": 792},
    "retention": {"test": 1192},
    "religion": {"train": 342, "dev": 171, "test": 342},
}


def test_split_sizes_exact():
    assert {s: split_sizes(s) for s in ALL_SUITES} == EXPECTED_SIZES
    for suite, sizes in EXPECTED_SIZES.items():
        for split, n in sizes.items():
            assert len(load_split(suite, split)) == n


def test_other_axes_sizes():
    assert split_sizes("crows-pairs", axis="religion") == {"test": 105}
    assert split_sizes("crows-pairs", axis="all") == {"test": 1508}
    assert split_sizes("stereoset", axis="race") == {"dev": 371}
    assert {r["bias_type"] for r in load_split("crows-pairs", "test", axis="religion")} == {"religion"}
    with pytest.raises(ValueError, match="only split"):
        load_split("stereoset", "test", axis="race")
    with pytest.raises(ValueError, match="no bias axis"):
        load_split("genbiaseval", "test", axis="race")


@pytest.mark.parametrize("suite", ["genbiaspro-cg", "genbiaseval", "genhinteval", "dama", "religion"])
def test_same_seed_byte_identical_other_seed_differs(suite):
    generated_a = {sp: to_jsonl(load_split(suite, sp, seed=0)) for sp in ("train", "dev", "test")}
    fresh = {"genbiaspro-cg": generated.build_genbiaspro_cg, "genbiaseval": generated.build_genbiaseval,
             "genhinteval": generated.build_genhinteval, "dama": generated.build_dama,
             "religion": generated.build_religion}[suite](0)
    assert {sp: to_jsonl(rows) for sp, rows in fresh.items()} == generated_a
    other = {sp: to_jsonl(load_split(suite, sp, seed=1)) for sp in ("train", "dev", "test")}
    assert other["test"] != generated_a["test"]
    def keys(parts):
        return sorted((r["profession"], r["template"], r.get("modifier")) for sp in parts
                      for r in map(json.loads, parts[sp].splitlines()))

    assert keys(other) == keys(generated_a)  # same samples, re-drawn splits (and, GenHintEval, hints)


@pytest.mark.parametrize("suite", ["genbiaspro-cg", "genbiaseval", "genhinteval", "dama", "religion"])
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
    rows = [r for sp in ("train", "dev", "test") for r in load_split("dama", sp)]
    assert len(rows) == 274 * 11 and all(abs(r["f"]) <= 0.25 for r in rows)
    src_subjects = {r["subject"].removeprefix("The ").removeprefix("the ") for r in src}
    assert src_subjects <= {r["profession"] for r in rows}


def test_published_sets_match_sources():
    st = load_split("stereoset", "test")
    raw = json.loads((sources.data_dir() / "stereoset/gender_test.json").read_text())
    assert [r["stereotype"] for r in st] == [x["data"]["stereotype"]["sentence"] for x in raw]
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
