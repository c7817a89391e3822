"""Pretraining data: multi-question relay dialogues are sub-calls with gold answers, built from
the training split only."""
import random

import lm
import tasks
import train


def _args(**kw):
    args = train.resolve(train.build_parser().parse_args(["--preset", "smoke"]))
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_relay_dialogues_are_subcalls_with_ideal_answers():
    args = _args()
    dialogues = train.relay_dialogues(30, args, random.Random(0), questions=6)
    assert len(dialogues) == 30
    for msgs in dialogues:
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        first = msgs[0]["content"]
        chunk, _, _ = first.rpartition("\nQuestion: ")
        n_lines = len(chunk.split("\n"))
        assert args.min_chunk_lines <= n_lines <= args.lines_per_chunk + 2
        for user, answer in zip(msgs[::2], msgs[1::2]):
            q = user["content"].rpartition("Question: ")[2]
            if user is not msgs[0]:
                assert user["content"] == f"Question: {q}"   # later turns carry the question only
            assert answer["content"] == tasks.ideal_relay(tasks.subcall_prompt(chunk, q))
    answers = [a["content"] for msgs in dialogues for a in msgs[1::2]]
    # both kinds of target occur: facts read from the chunk and `none` for questions about others
    assert "none" in answers and any(a != "none" for a in answers)


def test_relay_dialogues_use_training_names_only():
    eval_words = set()
    for fam in tasks.FAMILIES:
        for t in tasks.generate_tasks(2, fam, 20_000, split="eval", seed=5):
            eval_words |= set(t.context.replace(".", " ").split())
    train_words = set()
    for msgs in train.relay_dialogues(40, _args(), random.Random(1), questions=4):
        train_words |= set(" ".join(m["content"] for m in msgs).replace(".", " ").replace("?", " ").split())
    capitalised = {w for w in train_words & eval_words if len(w) == 5 and w[0].isupper() and w.isalpha()}
    capitalised -= set(tasks._ORG_SUFFIXES)   # "Labs", "Works": shared by design, not names
    assert not capitalised, sorted(capitalised)[:5]


def test_encode_dialogues_targets_the_last_answer_and_keeps_the_rest_as_prompt():
    tok = lm.Tokenizer(enc=lm.train_bpe(["Kelom Dasir works at Bolun Labs as a nurse. Question: none"], 300))
    msgs = [{"role": "user", "content": "Kelom Dasir works at Bolun Labs.\nQuestion: Where does Kelom Dasir work?"},
            {"role": "assistant", "content": "Bolun Labs"},
            {"role": "user", "content": "Question: Who works at Bolun Labs?"},
            {"role": "assistant", "content": "Kelom Dasir"}]
    [(p, c)] = train.encode_dialogues(tok, [msgs], max_len=1000)
    assert p == tok.chat(msgs[:-1]) and c == tok.encode("Kelom Dasir") + [tok.eos_id]
    assert train.encode_dialogues(tok, [msgs], max_len=len(p)) == []   # too long for the window


def test_false_fact_rate_counts_claims_on_none_chunks_only():
    pairs = [("a", "none"), ("b", "none"), ("c", "none"), ("d", "none"), ("e", "Ada Lovelace")]
    preds = ["none", "Bob Smith", "", "Bob Smith; Eve", "none"]      # an empty relay claims nothing
    assert train.false_fact_rate(preds, pairs) == 2 / 4
    assert train.false_fact_rate(["x"], [("e", "Ada")]) != train.false_fact_rate(["x"], [("e", "Ada")])  # nan


def test_relay_none_share_sets_the_share_of_none_answers():
    """--relay-none-share draws sub-questions from other chunks: more of them means more `none`
    answers; the default (0.4) keeps the data the earlier runs were trained on."""
    def none_share(share):
        d = train.relay_dialogues(60, _args(relay_none_share=share), random.Random(3), questions=6)
        answers = [m["content"] for msgs in d for m in msgs if m["role"] == "assistant"]
        return sum(a == "none" for a in answers) / len(answers)
    lo, mid, hi = none_share(0.0), none_share(0.4), none_share(0.9)
    assert lo + 0.1 < mid < hi - 0.1
    a = train.relay_dialogues(20, _args(), random.Random(4), questions=6)
    b = train.relay_dialogues(20, _args(relay_none_share=0.4), random.Random(4), questions=6)
    assert a == b
