"""The RLM loop with fake models: planner programs are right, bad root output ends episodes
cleanly, the scheduler batches across episodes, and the ledger counts what it should."""
import threading

import pytest

import rlm
import tasks


class FakeTok:
    """Token ids are the message text itself (one 'token' per prompt), so fake models see text."""
    eos_id, pad_id = -1, -2
    hf = None

    def chat(self, messages, add_generation_prompt=True):
        return [messages[-1]["content"]]


class FakeEndpoint(rlm.Endpoint):
    """An Endpoint whose model is a Python function of the last message text."""

    def __init__(self, name, fn, cloud):
        super().__init__(name=name, model=None, tok=FakeTok(), cloud=cloud, max_new_tokens=8)
        self.fn, self.calls, self.lock = fn, [], threading.Lock()

    def generate(self, prompts_ids, seed=None):
        with self.lock:
            self.calls.append(len(prompts_ids))
        outs = []
        for p in prompts_ids:
            text = self.fn(p[0])
            outs.append({"text": text, "n_in": len(p[0]) // 4 + 1, "n_out": len(text) // 4 + 1, "tokens": [],
                         "logprobs": [-0.1], "entropies": [0.2]})
        return outs


def oracle():
    return FakeEndpoint("worker", tasks.ideal_relay, cloud=False)


def root_says(text):
    return FakeEndpoint("supervisor", lambda _: text, cloud=True)


@pytest.mark.parametrize("family", tasks.FAMILIES)
@pytest.mark.parametrize("chars", [2_000, 12_000])
def test_planner_with_oracle_worker_is_always_right(family, chars):
    """The planner's program + ideal relays must reach the gold answer: this checks the planner,
    the REPL plumbing and the aggregation code the tiny root learns to write."""
    group = tasks.generate_tasks(3, family, chars, split="eval", seed=5)
    trajs = rlm.RLM(None, oracle()).run_many(group, "rlm-edge")
    for t in trajs:
        assert t.reason == "final", (t.reason, t.cells[-1:])
        assert t.score == 1.0, (t.question, t.answer, t.prediction)


def test_root_model_code_runs_and_ledger_counts_tokens():
    task = tasks.generate_tasks(1, "count", 3_000, seed=1)[0]
    code = "```repl\n" + rlm.planner_program(task, 8) + "\n```"
    root, worker = root_says(code), oracle()
    t = rlm.RLM(root, worker).run(task)
    assert t.score == 1.0 and t.reason == "final"
    led = t.ledger()
    subs = [c for c in t.calls if c["role"] == "sub"]
    assert led["subcalls"] == len(subs) == len(tasks.chunk_lines(task.context, 8))
    assert led["edge_in_tokens"] == sum(c["n_in"] for c in subs) and led["edge_in_tokens"] > 0
    assert led["cloud_in_tokens"] == t.calls[0]["n_in"] and led["cloud_out_tokens"] == t.calls[0]["n_out"]
    assert led["cost_usd"] == pytest.approx(led["cloud_in_tokens"] * rlm.PRICE_IN + led["cloud_out_tokens"] * rlm.PRICE_OUT)


@pytest.mark.parametrize("root_text,reason", [
    ("I think the answer is 42.", "no_code"),                       # no code block
    ("```repl\nraise ValueError('boom')\n```", "max_iterations"),   # code that raises every turn
    ("```repl\nx = 1\n```", "max_iterations"),                      # FINAL never comes
    ("```repl\nllm_query_batched(['q'] * 100000)\n```", "budget"),  # sub-call budget overrun
])
def test_bad_root_output_ends_episode_cleanly(root_text, reason):
    task = tasks.generate_tasks(1, "needle", 2_000, seed=2)[0]
    t = rlm.RLM(root_says(root_text), oracle(), max_iterations=2, max_subcalls=50).run(task)
    assert t.reason == reason
    assert isinstance(t.prediction, str)


def test_empty_worker_answers_do_not_crash():
    task = tasks.generate_tasks(1, "multihop", 3_000, seed=3)[0]
    t = rlm.RLM(None, FakeEndpoint("worker", lambda _: "", cloud=False)).run(task)
    assert t.reason in ("final", "max_iterations") and t.score == 0.0


def test_subcalls_from_concurrent_episodes_share_one_batch():
    """Every episode's first llm_query_batched lands in the same rollout call."""
    group = tasks.generate_tasks(6, "needle", 2_000, seed=4)
    worker = oracle()
    trajs = rlm.RLM(None, worker).run_many(group, "rlm-edge", concurrency=6)
    per_episode = [sum(c["role"] == "sub" for c in t.calls) for t in trajs]
    assert worker.calls == [sum(per_episode)]          # one batched call for all six episodes
    sequential = oracle()
    rlm.RLM(None, sequential).run_many(group, "rlm-edge", concurrency=1)
    assert sequential.calls == per_episode


def test_trajectories_round_trip_and_viewer(tmp_path, capsys):
    task = tasks.generate_tasks(1, "pairs", 2_000, seed=6)[0]
    t = rlm.RLM(None, oracle()).run(task)
    path = tmp_path / "t.jsonl"
    rlm.save_trajectories(str(path), [t])
    back = rlm.load_trajectories(str(path))[0]
    assert back.ledger() == t.ledger() and back.prediction == t.prediction
    rlm.show(str(path), 0)
    out = capsys.readouterr().out
    assert "Q: " + task.question in out and "[sub" in out


def test_summarize_rounds_length_to_the_nominal_target():
    group = rlm.tagged(tasks.generate_tasks(2, "count", 20_000, seed=1), 20_000)
    row = rlm.summarize(rlm.RLM(None, oracle()).run_many(group, "rlm-edge"), "rlm-edge")
    assert row["context_chars"] == 20_000 and row["accuracy"] == 1.0 and row["n"] == 2


def test_rlm_query_starts_a_child_rlm_up_to_the_depth_cap():
    """Depth 2: the root's rlm_query runs a child episode over the prompt (its own REPL, the
    parent's budget); depth 1: the same call is a plain worker sub-call."""
    def root(text):
        if "Question: outer" in text:
            return '```repl\nFINAL(rlm_query("some text\\nQuestion: inner?"))\n```'
        return '```repl\nFINAL("child saw " + str(len(context)) + " chars")\n```'
    task = tasks.Task(context="x" * 50, question="outer", answer="", family="custom")
    deep = rlm.RLM(FakeEndpoint("supervisor", root, cloud=True),
                   FakeEndpoint("worker", lambda _: "worker says hi", cloud=False), max_depth=2).run(task)
    assert deep.prediction == f"child saw {len('some text' + chr(10) + 'Question: inner?')} chars"
    flat = rlm.RLM(FakeEndpoint("supervisor", root, cloud=True),
                   FakeEndpoint("worker", lambda _: "worker says hi", cloud=False), max_depth=1).run(task)
    assert flat.prediction == "worker says hi"


def test_endpoint_splits_large_calls_without_changing_greedy_outputs():
    """Endpoint.generate answers a call in rollouts of at most max_batch rows (one 311-row call was
    2x slower on CPU than rows of 64); greedy outputs must not depend on that split."""
    import dataclasses

    import torch

    import lm
    tok = lm.Tokenizer(enc=lm.train_bpe(["alpha beta gamma delta " * 50], 300))
    model = lm.build_model(dataclasses.replace(lm.MODEL_PRESETS["smoke"]["worker"], vocab_size=tok.vocab_size), seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, tok.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 30, (21,), generator=g)]
    whole = rlm.Endpoint("worker", model, tok, False, 6, window=512, max_batch=64).generate(prompts)
    split = rlm.Endpoint("worker", model, tok, False, 6, window=512, max_batch=4).generate(prompts)
    assert [o["tokens"] for o in whole] == [o["tokens"] for o in split]
    assert rlm.Endpoint.max_batch == 64


def test_endpoint_memo_answers_repeated_greedy_prompts_once(monkeypatch):
    """The cascade sweep's memo: the same outputs as a fresh endpoint, rollout only on prompts not
    seen before (each once, even when repeated inside one call), and refused when sampling."""
    import dataclasses

    import pytest
    import torch

    import lm
    tok = lm.Tokenizer(enc=lm.train_bpe(["alpha beta gamma delta " * 50], 300))
    model = lm.build_model(dataclasses.replace(lm.MODEL_PRESETS["smoke"]["worker"], vocab_size=tok.vocab_size), seed=0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, tok.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 30, (9,), generator=g)]
    fresh = rlm.Endpoint("worker", model, tok, False, 6, window=512).generate(prompts)
    ep = rlm.Endpoint("worker", model, tok, False, 6, window=512, memo={})
    rows = []
    real = lm.rollout
    monkeypatch.setattr(lm, "rollout", lambda m, ids, *a, **k: (rows.append(len(ids)), real(m, ids, *a, **k))[1])
    before = rlm.REPLAYED_S[0]
    first = ep.generate(prompts[:5] + prompts[:2])               # two repeats inside one call
    second = ep.generate(prompts)                                # five seen, four new
    assert rows == [5, 4]
    assert rlm.REPLAYED_S[0] > before        # replayed answers bill the time they once took
    assert [o["tokens"] for o in first] == [o["tokens"] for o in fresh[:5] + fresh[:2]]
    assert [o["tokens"] for o in second] == [o["tokens"] for o in fresh]
    for a, b in zip(second, fresh):      # log-probs to float32 rounding (other batch mates, other padding)
        assert torch.allclose(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), atol=1e-4)
    with pytest.raises(ValueError, match="greedy"):
        rlm.Endpoint("worker", model, tok, False, 6, temperature=1.0, memo={}).generate(prompts)
