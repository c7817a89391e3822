"""On-policy distillation steps on tiny random models: every loss, the cross-tokenizer path, the
gates, the self-teacher's privileged prompt, and LoRA (merged weights reproduce unmerged outputs)."""
import argparse
import copy
import dataclasses

import pytest
import torch

import lm
import lora
import opd
import tasks


@pytest.fixture(scope="module")
def toks():
    texts = [t.context for t in tasks.generate_tasks(3, "count", 6_000, seed=0)]
    return lm.Tokenizer(enc=lm.train_bpe(texts, 320)), lm.Tokenizer(enc=lm.train_bpe(texts, 420))


def model_for(tok, seed, d=32):
    cfg = lm.ModelConfig(vocab_size=tok.vocab_size, d_model=d, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=2 * d,
                         max_seq_len=256)
    return lm.build_model(cfg, seed=seed).eval()


def pool():
    out = []
    for t in tasks.generate_tasks(2, "count", 2_000, seed=1):
        for chunk in tasks.chunk_lines(t.context, 4)[:4]:
            p = tasks.subcall_prompt(chunk, t.subquestions[0])
            out.append({"prompt": p, "relay": tasks.ideal_relay(p), "correct": False, "family": "count"})
    return out


def args_(**kw):
    a = dict(opd_batch=3, opd_samples=2, relay_tokens=6, lmbda=1.0, seed=0, opd_steps=4, opd_lr=1e-2, grad_clip=1.0,
             opd_loss="sampled_rkl", beta=0.5, gate="none", gate_threshold=None, self_ema=0.0, lora_rank=0,
             lora_alpha=32.0, lora_lr_mult=10.0, micro_batch=0)
    a.update(kw)
    return argparse.Namespace(**a)


def changed(before, model):
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("loss", ["sampled_rkl", "jsd", "forward_kl"])
@pytest.mark.parametrize("lmbda", [1.0, 0.0])
def test_opd_step_same_tokenizer(toks, loss, lmbda):
    tok = toks[0]
    student, teacher = model_for(tok, 0), model_for(tok, 1, d=48)
    before = [p.detach().clone() for p in student.parameters()]
    run = opd.OPD(args_(opd_loss=loss, lmbda=lmbda), student, tok, teacher, tok, pool())
    out = run.step(0)
    assert out["kept"] > 0 and torch.isfinite(torch.tensor(out["loss"]))
    assert run.counters["teacher_tokens"] > 0
    assert changed(before, student)


def test_opd_step_cross_tokenizer(toks):
    """A student with its own vocabulary learns from a teacher with another one (byte-aligned
    hybrid JSD/ULD loss)."""
    stok, ttok = toks
    assert stok.vocab_size != ttok.vocab_size
    student, teacher = model_for(stok, 0), model_for(ttok, 1, d=48)
    before = [p.detach().clone() for p in student.parameters()]
    run = opd.OPD(args_(), student, stok, teacher, ttok, pool())
    assert not run.same_tok and len(run.match_s) > 0
    out = run.step(0)
    assert out["kept"] > 0 and torch.isfinite(torch.tensor(out["loss"])) and changed(before, student)


def test_wrong_gate_skips_correct_episodes_and_their_teacher_cost(toks):
    tok = toks[0]
    items = [dict(it, correct=True) for it in pool()]
    run = opd.OPD(args_(gate="wrong"), model_for(tok, 0), tok, model_for(tok, 1), tok, items)
    assert run.step(0)["kept"] == 0 and run.counters["teacher_tokens"] == 0


def test_entropy_gate_keeps_only_uncertain_samples(toks):
    tok = toks[0]
    low = opd.OPD(args_(gate="entropy", gate_threshold=0.0), model_for(tok, 0), tok, model_for(tok, 1), tok, pool())
    high = opd.OPD(args_(gate="entropy", gate_threshold=1e9), model_for(tok, 0), tok, model_for(tok, 1), tok, pool())
    assert low.step(0)["kept"] > 0 and high.step(0)["kept"] == 0
    assert high.counters["teacher_tokens"] == 0 < low.counters["teacher_tokens"]


def test_gate_default_threshold_is_the_first_steps_median(toks):
    # regression: a fixed 0.05-nat default kept every sample of a high-entropy worker
    tok = toks[0]
    run = opd.OPD(args_(gate="entropy", gate_threshold=None), model_for(tok, 0), tok, model_for(tok, 1), tok, pool())
    out = run.step(0)
    assert run.threshold is not None and run.threshold > 0.05
    assert 0 < out["kept"] < run.counters["sampled"]


def test_self_teacher_reads_only_the_evidence_lines():
    t = tasks.generate_tasks(1, "needle", 2_000, seed=3)[0]
    chunk = next(c for c in tasks.chunk_lines(t.context, 8) if t.meta["target"] in c)
    p = opd.privileged_prompt(tasks.subcall_prompt(chunk, t.subquestions[0]))
    body = p.rpartition("\nQuestion: ")[0].split("\n")
    assert body and all(t.meta["target"] in line for line in body)
    assert tasks.ideal_relay(p) == t.answer                 # the evidence still answers it


def test_lora_starts_at_base_and_merged_weights_reproduce_unmerged_outputs(toks):
    tok = toks[0]
    model = model_for(tok, 0)
    x = torch.randint(0, tok.vocab_size, (2, 12))
    base = model(input_ids=x).logits.detach()
    lora.apply(model, rank=4, alpha=8)
    assert torch.allclose(model(input_ids=x).logits, base, atol=1e-6)      # B = 0 at init
    wrapped = [m for m in model.modules() if isinstance(m, lora.LoRALinear)]
    assert any("mlp" in n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear))
    for m in wrapped:
        torch.nn.init.normal_(m.B, std=0.05)
    unmerged = model(input_ids=x).logits.detach()
    assert not torch.allclose(unmerged, base, atol=1e-4)
    lora.merge(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    assert torch.allclose(model(input_ids=x).logits, unmerged, atol=1e-5)


def test_opd_with_lora_trains_only_adapters(toks):
    tok = toks[0]
    student = model_for(tok, 0)
    base_w = copy.deepcopy(student.model.layers[0].mlp.up_proj.weight.detach())
    run = opd.OPD(args_(lora_rank=4), student, tok, model_for(tok, 1), tok, pool())
    run.step(0)
    up = student.model.layers[0].mlp.up_proj
    assert isinstance(up, lora.LoRALinear) and torch.equal(up.base.weight, base_w)
    assert up.B.abs().sum() > 0


def test_byte_offsets_cover_the_decoded_text(toks):
    tok = toks[0]
    ids = tok.encode("Kelom Dasir works at Bekuk Partners.") + [tok.eos_id]
    offs = opd.byte_offsets(tok, ids)
    assert offs[0][0] == 0 and offs[-1] == (offs[-1][0], offs[-1][0])     # EOS is zero-width at the end
    assert all(a[1] == b[0] for a, b in zip(offs, offs[1:]))
    assert offs[-1][1] == len(tok.decode(ids).encode())


@pytest.mark.parametrize("loss,xtok", [("sampled_rkl", False), ("jsd", False), ("forward_kl", False),
                                       ("sampled_rkl", True)])
def test_micro_batches_give_the_same_update(toks, loss, xtok, monkeypatch):
    """--micro-batch only bounds memory: one step with 1 or 2 sequences per forward leaves the
    student with the weights of one step over the whole batch. (Plain SGD, so that the weights
    compare gradients: AdamW's first step is lr * sign(g), float noise on near-zero gradients.)"""
    import distill
    monkeypatch.setattr(distill, "make_optimizer", lambda model, lr, wd: torch.optim.SGD(model.parameters(), lr=lr))
    stok, ttok = toks if xtok else (toks[0], toks[0])
    weights, losses = [], []
    for mb in (0, 1, 2):
        student, teacher = model_for(stok, 0), model_for(ttok, 1, d=48)
        run = opd.OPD(args_(opd_loss=loss, micro_batch=mb, lmbda=0.5), student, stok, teacher, ttok, pool())
        losses.append(run.step(0)["loss"])
        weights.append(torch.cat([p.detach().reshape(-1) for p in student.parameters()]))
    for w, l in zip(weights[1:], losses[1:]):
        assert l == pytest.approx(losses[0], rel=1e-5, abs=1e-7)
        torch.testing.assert_close(w, weights[0], rtol=1e-5, atol=1e-6)


def test_fact_share_draws_prompts_whose_supervisor_relay_states_a_fact(toks):
    """--opd-fact-share 1: every prompt from the fact subset; 0: the plain uniform draw (the same RNG
    stream as before the option existed); a pool without facts fails with one line."""
    import random

    import util
    tok = toks[0]
    items = pool()
    assert any(it["relay"] == "none" for it in items) and any(it["relay"] != "none" for it in items)
    plain = opd.OPD(args_(opd_batch=12), model_for(tok, 0), tok, model_for(tok, 1), tok, items)
    rng, ref = random.Random(5), random.Random(5)
    assert plain.draw(rng) == [items[ref.randrange(len(items))] for _ in range(12)]
    facts = opd.OPD(args_(opd_batch=12, opd_fact_share=1.0), model_for(tok, 0), tok, model_for(tok, 1), tok, items)
    assert all(it["relay"] != "none" for it in facts.draw(random.Random(5)))
    half = opd.OPD(args_(opd_batch=400, opd_fact_share=0.5), model_for(tok, 0), tok, model_for(tok, 1), tok, items)
    base = sum(it["relay"] != "none" for it in items) / len(items)
    got = sum(it["relay"] != "none" for it in half.draw(random.Random(5))) / 400
    assert abs(got - (0.5 + 0.5 * base)) < 0.08                  # half from facts, half from the whole pool
    nones = [dict(it, relay="none") for it in items]
    with pytest.raises(util.UserError, match="opd-fact-share"):
        opd.OPD(args_(opd_fact_share=0.5), model_for(tok, 0), tok, model_for(tok, 1), tok, nones).draw(random.Random(0))
