"""The RL stage's batches on tiny random models: every reward kind yields finite group
advantages, equal rewards are skipped, and the sparse episode-level `task` reward trains on the
sub-calls of sampled RLM episodes."""
import argparse

import pytest
import torch

import lm
import rl_compress
import tasks


@pytest.fixture(scope="module")
def setup():
    tok = lm.Tokenizer(enc=lm.train_bpe([t.context for t in tasks.generate_tasks(3, "count", 6_000, seed=0)], 320))
    cfg = lm.ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                         max_seq_len=256)
    worker, sup = lm.build_model(cfg, seed=0).eval(), lm.build_model(cfg, seed=1).eval()
    pool = [{"prompt": tasks.subcall_prompt(c, t.subquestions[0])}
            for t in tasks.generate_tasks(2, "needle", 2_000, seed=1) for c in tasks.chunk_lines(t.context, 4)[:3]]
    a = argparse.Namespace(seed=0, rl_batch=3, rl_samples=3, relay_tokens=5, succinct="tokens", adv_std=False,
                           families=["needle", "count"], short_chars=1_000, lines_per_chunk=8, max_subcalls=64,
                           repl_timeout=10.0, concurrency=8)
    return a, tok, worker, sup, pool


@pytest.mark.parametrize("reward", ["answer", "recon", "mi", "correct"])
def test_sample_batch_every_reward(setup, reward):
    a, tok, worker, sup, pool = setup
    seqs, stats = rl_compress.sample_batch(a, worker, tok, pool, rl_compress.Rewarder(sup, tok), reward, 0, lam=0.1)
    assert torch.isfinite(torch.tensor(stats["reward"])) and 0.0 <= stats["zero_var_frac"] <= 1.0
    for p_ids, comp, old_lp, adv in seqs:
        assert len(comp) == len(old_lp) > 0 and abs(adv) < 1e6
    if reward != "correct":      # continuous rewards: groups essentially never tie
        assert seqs


def test_correct_reward_with_equal_rewards_skips_the_group(setup):
    a, tok, worker, sup, pool = setup
    _, stats = rl_compress.sample_batch(a, worker, tok, pool, rl_compress.Rewarder(sup, tok), "correct", 0, lam=0.0)
    # a random worker never writes the exact relay: every group is all-zero and skipped
    assert stats["zero_var_frac"] == 1.0


def test_task_reward_trains_on_episode_subcalls(setup):
    a, tok, worker, sup, pool = setup
    worker = __import__("copy").deepcopy(worker)
    with torch.no_grad():   # make EOS likely so sampled relay lengths (and so rewards) differ
        worker.lm_head.weight[tok.eos_id] = worker.model.norm.weight.sign() * 3.0
    seqs, stats = rl_compress.task_batch(a, worker, tok, 0, lam=0.5)
    # the score is 0 for a random worker, but the length penalty differs between episodes
    assert stats["zero_var_frac"] < 1.0 and seqs
    for p_ids, comp, old_lp, adv in seqs:
        assert len(comp) == len(old_lp)


@pytest.mark.parametrize("norm", ["token", "seq", "const"])
def test_rl_loss_micro_batches_give_the_full_batch_gradient(setup, norm):
    a, tok, worker, sup, pool = setup
    seqs, _ = rl_compress.sample_batch(a, worker, tok, pool, rl_compress.Rewarder(sup, tok), "answer", 0, lam=0.1)
    n_seq, n_tok = float(len(seqs)), float(sum(len(s[1]) for s in seqs))
    grads, losses = [], []
    for mb in (0, 1, 4):
        model = __import__("copy").deepcopy(worker)
        b = argparse.Namespace(micro_batch=mb, norm=norm, clip_low=0.2, clip_high=0.28, kl="k3", kl_coef=0.1,
                               relay_tokens=a.relay_tokens)
        loss, st = rl_compress.rl_loss(b, model, worker, seqs, n_seq, n_tok)
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
        assert 0.0 <= st["clip_frac"] <= 1.0
    for g, l in zip(grads[1:], losses[1:]):
        assert l == pytest.approx(losses[0], rel=1e-5, abs=1e-7)
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-6)
