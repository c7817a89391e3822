"""
Seeded synthetic deep-research corpus: a world of people, organisations and cities rendered as
short fact documents, and questions over the whole corpus in four families modelled on the RLM
and Minions benchmarks:

    needle    (S-NIAH)          In what year was {person} born?                     exact match
    count     (OOLONG)          How many people work at {org}?                      0.75 ** |pred - gold|
    multihop  (BrowseComp-Plus) In which city is the employer of {person} based?    exact match
    pairs     (OOLONG-Pairs)    List all pairs of people who work at {org} and live in {city}.  pair F1

Every line is one self-contained fact from five fixed templates (see docs/INTERFACES.md), so the
gold answer, the gold evidence and the ideal worker relay for any chunk (`ideal_relay`) are all
computable from the text alone. Run

    python -m tasks --family pairs --n 2 --context_chars 2000                 # print examples
    python -m tasks --family count --n 500 --context_chars 100000 --out data/count.jsonl

Train and eval use disjoint entity names (a fixed random half of all name words each), so eval
measures reading, not memorised names; both halves are spelt from the same syllables, so a
tokenizer trained on the train split cuts eval names into pieces it has seen.

What this deliberately does not do: no paraphrases (one template per fact, so a tiny worker can
learn it), no pronouns or coreference, no contradictory or updated facts, no mixing of families
in one call (loop over FAMILIES), no contexts beyond ~80M characters (the name pool runs out).
load_jsonl ignores keys it does not know.
"""

import argparse
import itertools
import json
import os
import random
import re
import tempfile
from dataclasses import asdict, dataclass, field
from functools import lru_cache

FAMILIES = ("needle", "count", "multihop", "pairs")
SPLITS = ("train", "eval")


@dataclass
class Task:
    context: str
    question: str
    answer: str
    family: str
    evidence: list[str] = field(default_factory=list)      # exact context lines needed to answer
    subquestions: list[str] = field(default_factory=list)  # what an expert root asks each chunk, in order
    meta: dict = field(default_factory=dict)

# -----------------------------------------------------------------------------
# names. Every word is CVCVC ("Kelom", "Dasir"): all words have the same length and are distinct,
# so no word is a substring of another and a line-anchored regex can never confuse two entities.
# Train and eval take disjoint random halves of the 29,400 words. (An earlier version split by
# first letter; eval names then began with capitals never seen in training, so their first token
# had an untrained embedding and no model could copy it. docs/LOG.md.)

_ONSETS, _VOWELS, _CODAS = "bdfgklmnprstvz", "aeiou", "nrlskm"
_ORG_SUFFIXES = ("Labs", "Group", "Systems", "Works", "Partners", "Holdings", "Dynamics", "Foundry")
_ROLES = ("an engineer", "a nurse", "a teacher", "an analyst", "a designer", "a manager",
          "a chemist", "a lawyer", "an accountant", "a pilot", "a librarian", "an architect")

@lru_cache(maxsize=None)
def _name_pools(split):
    words = [(a + v + b + w + c).capitalize() for a in _ONSETS for v in _VOWELS
             for b in _ONSETS for w in _VOWELS for c in _CODAS]
    words = [x for x in words if "none" not in x.lower()]  # "none" is the relay's abstain token
    random.Random("names").shuffle(words)  # fixed seed: pools never depend on the task seed
    words = words[SPLITS.index(split)::2]  # ~14,700 words per split
    # disjoint slices: a first name is never a last name, a city or an org word
    return {"first": words[:700], "last": words[700:2000], "org": words[2000:9000], "city": words[9000:10500]}

# -----------------------------------------------------------------------------
# the world and its documents

def _world(rng, split, context_chars):
    pools = _name_pools(split)
    n_people = context_chars // 90 + 12  # ~40% more people than fit, so the filler never runs out
    n_orgs = max(4, min(len(pools["org"]), n_people // 4))
    n_cities = max(4, min(len(pools["city"]), n_people // 10))
    cities = rng.sample(pools["city"], n_cities)
    orgs = [dict(name=f"{w} {rng.choice(_ORG_SUFFIXES)}", city=rng.choice(cities), year=rng.randint(1850, 2015))
            for w in rng.sample(pools["org"], n_orgs)]
    first, last = pools["first"], pools["last"]
    people = []
    for k in rng.sample(range(len(first) * len(last)), n_people):  # distinct full names
        org = rng.randrange(n_orgs)
        # half the people live where their employer is based, so (org, city) pairs cluster a little
        city = orgs[org]["city"] if rng.random() < 0.5 else rng.choice(cities)
        people.append(dict(name=f"{first[k // len(last)]} {last[k % len(last)]}", org=org,
                           role=rng.choice(_ROLES), city=city, year=rng.randint(1940, 2005)))
    return people, orgs, cities

def _person_lines(p, orgs):
    return {"works": f"{p['name']} works at {orgs[p['org']]['name']} as {p['role']}.",
            "lives": f"{p['name']} lives in {p['city']}.",
            "born": f"{p['name']} was born in {p['year']}."}

def _org_lines(o):
    return {"based": f"{o['name']} is based in {o['city']}.", "founded": f"{o['name']} was founded in {o['year']}."}

def _set_employees(rng, people, n_orgs, org, employees):
    # exactly `employees` work at `org`; anyone else placed there by chance moves to another org
    for i, p in enumerate(people):
        if i in employees:
            p["org"] = org
        elif p["org"] == org:
            p["org"] = (org + rng.randrange(1, n_orgs)) % n_orgs

def _make_task(family, context_chars, split, seed, index):
    rng = random.Random(f"{family}/{context_chars}/{split}/{seed}/{index}")
    people, orgs, cities = _world(rng, split, context_chars)
    fit = context_chars // 130  # roughly how many person documents end up in the context
    # plant the question into the world; people are in random order, so person 0 is a random person
    target, org, city = people[0], people[0]["org"], None
    keep = [("p", 0)]  # documents that must be in the context whatever its length
    if family == "count":
        k = rng.randint(1, max(1, min(12, fit // 3)))
        _set_employees(rng, people, len(orgs), org, set(range(k)))
        keep = [("p", i) for i in range(k)]
    elif family == "multihop":
        keep.append(("o", org))
    elif family == "pairs":
        m = rng.choices((1, 2, 3, 4, 5), weights=(1, 3, 3, 2, 2))[0]  # m == 1 gives the answer "none"
        extra = rng.randint(0, 2)  # co-workers living elsewhere: "Who works at" alone is not enough
        city = rng.choice(cities)
        _set_employees(rng, people, len(orgs), org, set(range(m + extra)))
        for i in range(m + extra):
            people[i]["city"] = city if i < m else rng.choice([c for c in cities if c != city])
        keep = [("p", i) for i in range(m + extra)]

    def render(doc):
        kind, i = doc
        lines = list((_person_lines(people[i], orgs) if kind == "p" else _org_lines(orgs[i])).values())
        rng.shuffle(lines)
        return "\n".join(lines)

    docs = {d: render(d) for d in keep}
    size = sum(len(t) + 2 for t in docs.values()) - 2
    filler = [("p", i) for i in range(len(people))] + [("o", j) for j in range(len(orgs))]
    rng.shuffle(filler)
    for d in filler:  # overshoots the target by at most one document (~110 chars)
        if size >= context_chars:
            break
        if d not in docs:
            docs[d] = render(d)
            size += len(docs[d]) + 2
    order = list(docs)
    rng.shuffle(order)
    context = "\n\n".join(docs[d] for d in order)

    # the answer is read off the documents actually in the context, not off the plan
    present = [people[i] for kind, i in order if kind == "p"]
    name, org_name = target["name"], orgs[org]["name"]
    meta = {"split": split, "seed": seed, "index": index}
    if family == "needle":
        question = f"In what year was {name} born?"
        answer, evidence = str(target["year"]), [_person_lines(target, orgs)["born"]]
        subquestions, meta["target"] = [question], name
    elif family == "count":
        workers = [p for p in present if p["org"] == org]
        question, answer = f"How many people work at {org_name}?", str(len(workers))
        evidence = [_person_lines(p, orgs)["works"] for p in workers]
        subquestions, meta["org"] = [f"Who works at {org_name}?"], org_name
    elif family == "multihop":
        question = f"In which city is the employer of {name} based?"
        answer = orgs[org]["city"]
        evidence = [_person_lines(target, orgs)["works"], _org_lines(orgs[org])["based"]]
        subquestions = [f"Where does {name} work?", f"Where is {org_name} based?"]
        meta.update(target=name, org=org_name)
    elif family == "pairs":
        both = [p for p in present if p["org"] == org and p["city"] == city]
        names = sorted(p["name"] for p in both)
        question = f"List all pairs of people who work at {org_name} and live in {city}."
        answer = "; ".join(f"{a} & {b}" for a, b in itertools.combinations(names, 2)) or "none"
        evidence = [_person_lines(p, orgs)[k] for p in both for k in ("works", "lives")]
        subquestions = [f"Who works at {org_name}?", f"Who lives in {city}?"]
        meta.update(org=org_name, city=city)
    wanted = set(evidence)
    evidence = [line for line in context.split("\n") if line in wanted]  # in order of appearance
    return Task(context, question, answer, family, evidence, subquestions, meta)

def generate_tasks(n: int, family: str, context_chars: int, split: str = "train", seed: int = 0) -> list[Task]:
    """n tasks of one family, each ~context_chars long (never shorter than its answer facts)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    # task i depends only on (family, context_chars, split, seed, i): a larger n extends a smaller one
    return [_make_task(family, context_chars, split, seed, i) for i in range(n)]

# -----------------------------------------------------------------------------
# the worker's side: sub-call prompts, the ideal relay, chunking

def subcall_prompt(chunk: str, subq: str) -> str:
    return f"{chunk}\nQuestion: {subq}"

def chunk_lines(context: str, lines_per_chunk: int) -> list[str]:
    # the exact code an expert root writes in the REPL, so the function and the root agree
    L, k = context.split("\n"), lines_per_chunk
    return ["\n".join(L[i:i + k]) for i in range(0, len(L), k)]

# (question template, line template with {} for the question's entity, answer lists many names?)
_SUBQUESTIONS = [
    (re.compile(r"In what year was (.+) born\?"), r"{} was born in (\d+)\.", False),
    (re.compile(r"Who works at (.+)\?"), r"(.+) works at {} as .+\.", True),
    (re.compile(r"Where does (.+) work\?"), r"{} works at (.+?) as .+\.", False),
    (re.compile(r"Where is (.+) based\?"), r"{} is based in (.+)\.", False),
    (re.compile(r"Who lives in (.+)\?"), r"(.+) lives in {}\.", True),
]

def ideal_relay(prompt: str) -> str:
    """The ideal worker answer, read from the prompt text alone. A question outside the five
    sub-question templates gets "none": the worker is only ever taught those."""
    chunk, _, question = prompt.rpartition("\nQuestion: ")
    for question_re, line_template, many in _SUBQUESTIONS:
        m = question_re.fullmatch(question.strip())
        if m:
            line_re = re.compile(line_template.format(re.escape(m.group(1))))
            found = [lm.group(1) for lm in map(line_re.fullmatch, chunk.split("\n")) if lm]
            if not found:
                return "none"
            return "; ".join(found) if many else found[0]
    return "none"

def parse_relay_names(relay: str) -> list[str]:
    return [x.strip() for x in relay.split(";") if x.strip() and x.strip().lower() != "none"]

# -----------------------------------------------------------------------------
# scoring

def _norm(s):
    return " ".join(str(s).split()).lower().rstrip(".").strip()

def _pair_set(s):
    out = set()
    for item in s.split(";"):
        item = _norm(item)
        if item in ("", "none"):
            continue
        names = [_norm(x) for x in item.split("&")]
        # a malformed item stays in the set as a string: it can never match, so it costs precision
        out.add(frozenset(names) if len(names) == 2 and all(names) else item)
    return out

def score(family: str, prediction: str, answer: str) -> float:
    if family in ("needle", "multihop", "custom"):
        return float(_norm(prediction) == _norm(answer))
    if family == "count":
        pred = _norm(prediction)
        if not re.fullmatch(r"-?\d+", pred):
            return 0.0
        return 0.75 ** abs(int(pred) - int(_norm(answer)))
    if family == "pairs":
        P, G = _pair_set(prediction), _pair_set(answer)
        if not P and not G:
            return 1.0
        return 2 * len(P & G) / (len(P) + len(G))  # F1 = 2tp / (|pred| + |gold|)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES + ('custom',))}")

# -----------------------------------------------------------------------------
# JSONL, so users can bring their own data

_TYPES = {"context": str, "question": str, "answer": str, "family": str,
          "evidence": list, "subquestions": list, "meta": dict}

def save_jsonl(path, tasks):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".jsonl")  # same dir: os.replace is atomic
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for t in tasks:
                f.write(json.dumps(asdict(t)) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

def load_jsonl(path) -> list[Task]:
    tasks = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in ("context", "question", "answer"):
                if key not in row:
                    raise ValueError(f"{where}: missing key {key!r}")
            for key, typ in _TYPES.items():
                if key in row and not isinstance(row[key], typ):
                    raise ValueError(f"{where}: {key!r} must be {typ.__name__}, got {type(row[key]).__name__}")
            for key in ("evidence", "subquestions"):
                if not all(isinstance(x, str) for x in row.get(key, [])):
                    raise ValueError(f"{where}: {key!r} must be a list of strings")
            family = row.get("family", "custom")  # custom: exact-match scoring
            if family not in FAMILIES + ("custom",):
                raise ValueError(f"{where}: unknown family {family!r}; choose one of {', '.join(FAMILIES + ('custom',))}")
            tasks.append(Task(row["context"], row["question"], row["answer"], family,
                              row.get("evidence", []), row.get("subquestions", []), row.get("meta", {})))
    return tasks


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="generate synthetic deep-research tasks")
    parser.add_argument("--family", type=str, default="needle", choices=FAMILIES)
    parser.add_argument("--n", type=int, default=2, help="number of tasks")
    parser.add_argument("--context_chars", type=int, default=2000, help="target context length in characters")
    parser.add_argument("--split", type=str, default="train", choices=SPLITS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=str, default="", help="write JSONL here instead of printing")
    args = parser.parse_args()
    print(vars(args))
    tasks = generate_tasks(args.n, args.family, args.context_chars, args.split, args.seed)
    if args.out:
        save_jsonl(args.out, tasks)
        print(f"wrote {len(tasks)} tasks to {args.out}")
    else:
        for t in tasks:
            print(f"{t.context[:600]}\n...\n[{len(t.context)} chars]\nQ: {t.question}\nA: {t.answer}\n"
                  f"evidence: {t.evidence}\nsubquestions: {t.subquestions}\n")
