"""Tests for tasks.py: answers against an independent brute-force reader, evidence, relays, splits,
determinism, lengths, scoring and JSONL. Run: python -m pytest -q tests/test_tasks.py"""

import itertools
import json
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tasks import (FAMILIES, Task, chunk_lines, generate_tasks, ideal_relay, load_jsonl,  # noqa: E402
                   parse_relay_names, save_jsonl, score, subcall_prompt)

# -----------------------------------------------------------------------------
# an independent reader: str.partition instead of the module's regexes, and it only sees text


def read_facts(text):
    """Parse fact lines into dicts; fails loudly on any line outside the five templates."""
    works, lives, born, based, founded, order = {}, {}, {}, {}, {}, []
    for line in text.split("\n"):
        if not line:
            continue
        assert line.endswith("."), line
        body = line[:-1]
        if " works at " in body:
            person, _, rest = body.partition(" works at ")
            org, _, role = rest.rpartition(" as ")
            assert role.split(" ")[0] in ("a", "an"), line
            assert person not in works, f"two works-at lines for {person}"
            works[person] = org
            order.append(person)
        elif " lives in " in body:
            person, _, city = body.partition(" lives in ")
            assert person not in lives
            lives[person] = city
        elif " was born in " in body:
            person, _, year = body.partition(" was born in ")
            assert person not in born and year.isdigit()
            born[person] = year
        elif " is based in " in body:
            org, _, city = body.partition(" is based in ")
            assert org not in based
            based[org] = city
        elif " was founded in " in body:
            org, _, year = body.partition(" was founded in ")
            founded[org] = year
        else:
            raise AssertionError(f"unknown line {line!r}")
    return dict(works=works, lives=lives, born=born, based=based, founded=founded, order=order)


def brute_answer(context, question):
    f = read_facts(context)
    if question.startswith("In what year was "):
        person = question.removeprefix("In what year was ").removesuffix(" born?")
        return f["born"].get(person, "none")
    if question.startswith("How many people work at "):
        org = question.removeprefix("How many people work at ").removesuffix("?")
        return str(sum(o == org for o in f["works"].values()))
    if question.startswith("In which city is the employer of "):
        person = question.removeprefix("In which city is the employer of ").removesuffix(" based?")
        return f["based"].get(f["works"].get(person), "none")
    if question.startswith("List all pairs of people who work at "):
        org, _, city = question.removeprefix("List all pairs of people who work at ").removesuffix(".").partition(" and live in ")
        both = sorted(p for p, o in f["works"].items() if o == org and f["lives"].get(p) == city)
        return "; ".join(f"{a} & {b}" for a, b in itertools.combinations(both, 2)) or "none"
    raise AssertionError(f"unknown question {question!r}")


CASES = [(0, 2000), (1, 2000), (2, 20000), (3, 20000), (4, 200000)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed,chars", CASES)
def test_answer_and_evidence_match_brute_force(family, seed, chars):
    for t in generate_tasks(1 if chars > 20000 else 3, family, chars, seed=seed):
        assert t.family == family and t.meta["split"] == "train" and t.meta["seed"] == seed
        assert brute_answer(t.context, t.question) == t.answer
        assert score(family, t.answer, t.answer) == 1.0
        lines = set(t.context.split("\n"))
        assert t.evidence and all(e in lines for e in t.evidence)
        assert brute_answer("\n".join(t.evidence), t.question) == t.answer  # evidence suffices
        assert abs(len(t.context) - chars) <= 0.1 * chars


def test_needle_target_appears_once_and_distractors_exist():
    for t in generate_tasks(5, "needle", 20000, seed=7):
        person = t.meta["target"]
        assert sum(line.startswith(person + " was born in") for line in t.context.split("\n")) == 1
        assert sum(person in line for line in t.context.split("\n")) == 3  # only its own document
        assert len(read_facts(t.context)["born"]) > 50  # every other person is a hard distractor


def test_answer_ranges_vary():
    counts = {int(t.answer) for t in generate_tasks(40, "count", 20000, seed=1)}
    assert min(counts) >= 1 and max(counts) <= 12 and len(counts) >= 6
    sizes = [0 if t.answer == "none" else len(t.answer.split(";")) for t in generate_tasks(40, "pairs", 20000, seed=1)]
    assert sum(s >= 1 for s in sizes) >= 30 and max(sizes) >= 6  # mostly 2-5 people, some "none"


@pytest.mark.parametrize("family", FAMILIES)
def test_ideal_relay_on_every_chunk(family):
    for t in generate_tasks(2, family, 20000, seed=5):
        f = read_facts(t.context)
        chunks = chunk_lines(t.context, 8)
        relays = [[ideal_relay(subcall_prompt(c, q)) for c in chunks] for q in t.subquestions]
        hits = [[r for r in rs if r != "none"] for rs in relays]
        names = [[n for r in rs for n in parse_relay_names(r)] for rs in relays]
        if family == "needle":
            assert hits[0] == [t.answer]
        elif family == "count":
            org = t.meta["org"]
            assert names[0] == [p for p in f["order"] if f["works"][p] == org]  # order of appearance
            assert str(len(set(names[0]))) == t.answer
            whole = ideal_relay(subcall_prompt(t.context, t.subquestions[0]))  # one chunk, many names
            assert whole == "; ".join(p for p in f["order"] if f["works"][p] == org)
        elif family == "multihop":
            assert hits[0] == [f["works"][t.meta["target"]]] == [t.meta["org"]]
            assert hits[1] == [t.answer]
        elif family == "pairs":
            org, city = t.meta["org"], t.meta["city"]
            assert set(names[0]) == {p for p, o in f["works"].items() if o == org}
            assert set(names[1]) == {p for p, c in f["lives"].items() if c == city}
            both = sorted(set(names[0]) & set(names[1]))
            assert ("; ".join(f"{a} & {b}" for a, b in itertools.combinations(both, 2)) or "none") == t.answer


def test_ideal_relay_hand_examples():
    chunk = ("Ana Bel works at Vantor Labs as an engineer.\nAna Bel lives in Ostrava.\n"
             "Ana Bel was born in 1984.\n\nVantor Labs is based in Brno.\nCid Dox works at Vantor Labs as a nurse.\n"
             "Abe Zed works at Vantor Labs as a pilot.")
    assert ideal_relay(subcall_prompt(chunk, "In what year was Ana Bel born?")) == "1984"
    assert ideal_relay(subcall_prompt(chunk, "Who works at Vantor Labs?")) == "Ana Bel; Cid Dox; Abe Zed"  # order of appearance
    assert ideal_relay(subcall_prompt(chunk, "Where does Cid Dox work?")) == "Vantor Labs"
    assert ideal_relay(subcall_prompt(chunk, "Where is Vantor Labs based?")) == "Brno"
    assert ideal_relay(subcall_prompt(chunk, "Who lives in Ostrava?")) == "Ana Bel"
    assert ideal_relay(subcall_prompt(chunk, "Who lives in Brno?")) == "none"
    assert ideal_relay(subcall_prompt(chunk, "In what year was Cid Dox born?")) == "none"
    assert ideal_relay(subcall_prompt(chunk, "What is the meaning of life?")) == "none"
    assert parse_relay_names("Ana Bel; Cid Dox ;") == ["Ana Bel", "Cid Dox"]
    assert parse_relay_names("none") == [] and parse_relay_names("None") == []


def test_subcall_prompt_and_chunk_lines_exact():
    assert subcall_prompt("a\nb", "Who lives in X?") == "a\nb\nQuestion: Who lives in X?"
    assert chunk_lines("a\nb\n\nc\nd", 2) == ["a\nb", "\nc", "d"]
    ctx = generate_tasks(1, "count", 20000)[0].context
    assert "\n".join(chunk_lines(ctx, 8)) == ctx  # chunks tile the context


def entity_names(t):
    f = read_facts(t.context)
    people = set(f["works"]) | set(f["lives"]) | set(f["born"])
    orgs = set(f["works"].values()) | set(f["based"]) | set(f["founded"])
    cities = set(f["lives"].values()) | set(f["based"].values())
    return people, orgs, cities


def test_names_well_formed_and_train_eval_disjoint():
    words = {}
    for split in ("train", "eval"):
        words[split] = set()
        for family in FAMILIES:
            for t in generate_tasks(3, family, 20000, split=split, seed=11):
                people, orgs, cities = entity_names(t)
                for name in people | orgs | cities:
                    assert not any(bad in name.lower() for bad in ("\n", ";", "?", "none")), name
                # all name words are distinct across people, org words and cities within a world
                pw = {w for p in people for w in p.split()}
                ow = {o.split()[0] for o in orgs}
                assert not (pw & ow) and not (pw & cities) and not (ow & cities)
                words[split] |= pw | ow | cities
    assert len(words["train"]) > 500 and len(words["eval"]) > 500
    assert not (words["train"] & words["eval"])
    with pytest.raises(ValueError, match="train"):
        generate_tasks(1, "needle", 2000, split="test")


def test_deterministic_by_seed():
    a = generate_tasks(3, "pairs", 5000, seed=3)
    assert a == generate_tasks(3, "pairs", 5000, seed=3)
    assert a[:2] == generate_tasks(2, "pairs", 5000, seed=3)
    assert a[0].context != generate_tasks(1, "pairs", 5000, seed=4)[0].context
    assert a[0].context != generate_tasks(1, "pairs", 5000, split="eval", seed=3)[0].context


def test_unknown_family_raises():
    with pytest.raises(ValueError, match="needle, count, multihop, pairs"):
        generate_tasks(1, "all", 2000)
    with pytest.raises(ValueError, match="unknown family"):
        score("bogus", "a", "a")


def test_small_context_keeps_answer_facts():
    # a target below what the facts need: the context is the facts, never less
    for family in FAMILIES:
        t = generate_tasks(1, family, 50, seed=2)[0]
        assert brute_answer(t.context, t.question) == t.answer


def test_million_char_generation_is_fast():
    t0 = time.time()
    t = generate_tasks(1, "pairs", 1_000_000, seed=0)[0]
    assert time.time() - t0 < 4.0
    assert abs(len(t.context) - 1_000_000) <= 100_000


def test_score_examples():
    assert score("needle", " 1984. ", "1984") == 1.0
    assert score("multihop", "ostrava", "Ostrava") == 1.0 and score("multihop", "Brno", "Ostrava") == 0.0
    assert score("count", "7", "7") == 1.0 and score("count", "7.", "7") == 1.0
    assert score("count", "5", "7") == pytest.approx(0.75 ** 2)
    assert score("count", "9", "7") == pytest.approx(0.5625)
    assert score("count", "seven", "7") == 0.0 and score("count", "", "7") == 0.0
    gold = "A & B; A & C; B & C"
    assert score("pairs", "C & B; B & A; A & C", gold) == 1.0  # order-insensitive inside and across pairs
    assert score("pairs", "B & A; C & D", gold) == pytest.approx(2 * 1 / (2 + 3))  # tp 1, |P| 2, |G| 3
    assert score("pairs", "none", "none") == 1.0
    assert score("pairs", "none", "A & B") == 0.0 and score("pairs", "A & B", "none") == 0.0
    assert score("pairs", "A & B; garbage", "A & B") == pytest.approx(2 / 3)  # malformed items cost precision
    assert score("custom", "Yes", "yes.") == 1.0


def test_jsonl_round_trip(tmp_path):
    ts = generate_tasks(2, "multihop", 3000) + generate_tasks(1, "count", 3000)
    path = tmp_path / "sub" / "tasks.jsonl"
    save_jsonl(path, ts)
    assert load_jsonl(path) == ts
    assert os.listdir(path.parent) == ["tasks.jsonl"]  # no temp file left behind
    custom = tmp_path / "custom.jsonl"
    custom.write_text(json.dumps({"context": "x", "question": "q?", "answer": "Yes"}) + "\n\n")
    assert load_jsonl(custom) == [Task("x", "q?", "Yes", "custom", [], [], {})]


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"context": "c", "question": "q"}', "missing key 'answer'"),
    ('{"context": 1, "question": "q", "answer": "a"}', "'context' must be str"),
    ('{"context": "c", "question": "q", "answer": 7}', "'answer' must be str"),
    ('{"context": "c", "question": "q", "answer": "a", "evidence": "line"}', "'evidence' must be list"),
    ('{"context": "c", "question": "q", "answer": "a", "subquestions": [1]}', "list of strings"),
    ('{"context": "c", "question": "q", "answer": "a", "meta": []}', "'meta' must be dict"),
    ('{"context": "c", "question": "q", "answer": "a", "family": "all"}', "unknown family"),
]


@pytest.mark.parametrize("line,what", BAD_LINES)
def test_malformed_line_names_file_and_line(tmp_path, line, what):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"context": "c", "question": "q", "answer": "a"})
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError) as err:
        load_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ") and what in str(err.value)


def test_cli_writes_jsonl(tmp_path):
    out = tmp_path / "count.jsonl"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "tasks", "--family", "count", "--n", "2", "--context_chars", "3000", "--out", str(out)]
    subprocess.run(cmd, cwd=root, check=True, capture_output=True, timeout=60)
    assert load_jsonl(out) == generate_tasks(2, "count", 3000)
