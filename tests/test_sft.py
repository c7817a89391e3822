"""The SFT loop's masking and batching, and the few-shot demonstration rule."""
import torch

import distill
import lm
import tasks


def test_only_completion_tokens_are_trained():
    """Prompt tokens (chunk text, REPL output, anything the environment wrote) get mask 0; the
    completion and its EOS get mask 1; padding gets 0."""
    ex = [([5, 6, 7], [8, 9, 2]), ([5, 6], [3, 2])]
    ids, attn, tmask = distill.pad_examples(ex, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 2], [5, 6, 3, 2, 0, 0]]
    assert tmask.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]]
    assert attn.tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]


def test_completion_nll_matches_a_loop_reference():
    cfg = lm.ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=32)
    model = lm.build_model(cfg, seed=0)
    ex = [([1, 2, 3], [4, 5]), ([6], [7, 8, 9])]
    got = distill.completion_nll(model, *distill.pad_examples(ex, 0))
    total, n = 0.0, 0
    for p, c in ex:   # one sequence at a time, no padding
        logits = model(input_ids=torch.tensor([p + c])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        for k, tokid in enumerate(c):
            total -= lp[len(p) + k - 1, tokid].item()
            n += 1
    assert abs(got.item() - total / n) < 1e-4


def test_completion_nll_weighted_chunked_value_and_grad_match_float64_full_logits():
    # prompt weight 0.5 (pretraining style), chunks of 2 positions: value and gradient must equal
    # the plain full-logits loss computed in float64
    cfg = lm.ModelConfig(vocab_size=53, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=32)
    model = lm.build_model(cfg, seed=1)
    ex = [([1, 2, 3, 9], [4, 5]), ([6], [7, 8, 9, 10, 2])]
    ids, attn, tmask = distill.pad_examples(ex, 0, prompt_weight=0.5)
    got = distill.completion_nll(model, ids, attn, tmask, num_tokens=7.5, chunk_tokens=2)
    got.backward()
    g_got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    m64 = model.double()
    logp = torch.log_softmax(m64(input_ids=ids, attention_mask=attn).logits[:, :-1], -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ref = (nll * tmask[:, 1:].double()).sum() / 7.5
    ref.backward()
    assert abs(got.item() - ref.item()) < 1e-5
    for g, p in zip(g_got, m64.parameters()):
        torch.testing.assert_close(g.double(), p.grad, rtol=1e-4, atol=1e-6)


def test_micro_batches_bound_padding_and_keep_every_example():
    batch = [([1] * n, [2]) for n in (3, 50, 4, 60, 5, 2)]
    mbs = distill.micro_batches(batch, max_rows=4, max_tokens=100)
    assert sorted(len(p) for mb in mbs for p, _ in mb) == sorted(len(p) for p, _ in batch)
    for mb in mbs:
        assert len(mb) <= 4 and len(mb) * max(len(p) + len(c) for p, c in mb) <= 122


def test_few_shot_demos_match_the_kind_of_subquestion_and_rank_by_likelihood():
    t = tasks.generate_tasks(1, "count", 2_000, seed=1)[0]
    chunks = tasks.chunk_lines(t.context, 8)
    pool = []
    for i, c in enumerate(chunks[:6]):
        for q in (t.subquestions[0], f"In what year was {t.meta['org']} born?"):
            p = tasks.subcall_prompt(c, q)
            pool.append({"prompt": p, "relay": f"r{i}", "lp": -i * 0.1})
    demos = distill.choose_demos(pool, 2)
    prompt = tasks.subcall_prompt(chunks[-1], "Who works at Zzzzz Labs?")
    shown = distill.few_shot_prompt(prompt, demos)
    assert shown.endswith(prompt) and shown.count("Example:") == 2
    assert "Answer: r0" in shown and "Answer: r1" in shown        # the two most likely, same kind
    assert "born?" not in shown.rpartition(prompt)[0]
