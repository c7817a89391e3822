"""Tests for lm.py: tokenizers, checkpoints, and the rollout engine against naive HF generation.

Run: python -m pytest -q tests/test_lm.py   (CPU, offline, tiny random models; well under a minute)
RLM_SLOW=1 also runs the torch.compile test (a minute or more of compilation on CPU).
"""
import copy
import dataclasses
import os
import random
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lm  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a shared 2-core box OpenMP threads that wait
# on each other made this file 10x slower (15 s -> 210 s) whenever another job was running.
torch.set_num_threads(1)
slow = pytest.mark.skipif(not os.environ.get("RLM_SLOW"), reason="slow: set RLM_SLOW=1")

PEOPLE = ["Alice Moreau", "Bilal Okafor", "Chen Wei", "Dana Kowalski", "Emil Sorensen", "Farah Haddad"]
ORGS = ["Acme Corp", "Borealis Labs", "Cobalt Systems", "Dunmore Bank"]
CITIES = ["Lyon", "Osaka", "Nairobi", "Quito", "Tallinn"]


def make_corpus(n_lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    templates = ["{p} works at {o} as an engineer.", "{p} lives in {c}.", "{p} was born in {y}.",
                 "{o} is based in {c}.", "{o} was founded in {y}.", "Question: Who works at {o}?"]
    return [rng.choice(templates).format(p=rng.choice(PEOPLE), o=rng.choice(ORGS), c=rng.choice(CITIES),
                                         y=rng.randint(1900, 2024)) for _ in range(n_lines)]


@pytest.fixture(scope="module")
def tok():
    return lm.Tokenizer(enc=lm.train_bpe(make_corpus(2000), vocab_size=400))


# -----------------------------------------------------------------------------
# Tokenizers

TEXTS = ["Alice Moreau was born in 1984.\nQuestion: Who works at Acme Corp?  ",
         "Zoë's café — 東京 naïve 😀 <|eos|> tabs\tand  spaces"]


def test_train_bpe_round_trip(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(TEXTS[0])
    assert len(ids) < len(TEXTS[0].encode()) / 2, "merges should compress the training distribution"
    assert tok.eos_id not in tok.encode("<|eos|>"), "special-token text must be encoded as ordinary text"
    assert tok.vocab_size == 400


def test_numbers_split_into_single_digits(tok):
    digit_tokens = [tok.decode([i]).strip() for i in tok.encode("founded in 1984 and 2024")
                    if any(ch.isdigit() for ch in tok.decode([i]))]
    assert digit_tokens == list("19842024")


def test_train_bpe_speed():
    """~300 KB with ~4k distinct words (random letter strings) must train to vocab 1024 in < 10 s."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
             for _ in range(4000)]
    corpus = [" ".join(rng.choices(words, k=8)) + f" in {rng.randint(1900, 2024)}." for _ in range(5000)]
    t0 = time.perf_counter()
    enc = lm.train_bpe(corpus, vocab_size=1024)
    assert time.perf_counter() - t0 < 10
    assert enc.n_vocab == 1024


def test_offsets_cover_bytes(tok):
    for text in TEXTS:
        data, spans = text.encode(), tok.offsets(text)
        assert len(spans) == len(tok.encode(text))
        assert spans[0][0] == 0 and spans[-1][1] == len(data)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert b"".join(data[s:e] for s, e in spans) == data


def test_chat_rendering(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Where?"}]
    ids = tok.chat(msgs)
    special = {name: tok.enc.encode_single_token(name) for name in lm.SPECIAL_TOKENS}
    expected = ([special["<|system|>"]] + tok.encode("Be brief.") + [special["<|user|>"]] + tok.encode("Hi")
                + [special["<|assistant|>"]] + tok.encode("Hello") + [tok.eos_id]
                + [special["<|user|>"]] + tok.encode("Where?") + [special["<|assistant|>"]])
    assert ids == expected
    assert tok.chat(msgs, add_generation_prompt=False) == expected[:-1]


def test_tokenizer_save_load(tok, tmp_path):
    tok.save(str(tmp_path))
    tok2 = lm.Tokenizer.load(str(tmp_path))
    for text in TEXTS:
        assert tok2.encode(text) == tok.encode(text)
    assert (tok2.eos_id, tok2.pad_id, tok2.vocab_size) == (tok.eos_id, tok.pad_id, tok.vocab_size)
    strings = tok2.token_strings()
    assert len(strings) == tok.vocab_size and strings[ord("a")] == "a" and strings[tok.eos_id] == "<|eos|>"


def test_hf_tokenizer_path(tmp_path):
    """The HF branch of Tokenizer, with a byte-level BPE built in memory (no download)."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(make_corpus(500), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t = lm.Tokenizer(hf=PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<pad>"))
    text = TEXTS[0]
    ids = t.encode(text)
    assert t.decode(ids + [t.eos_id, t.pad_id]) == text
    spans = t.offsets(text)
    assert len(spans) == len(ids) and spans[-1][1] == len(text.encode())
    assert t.decode(t.chat([{"role": "user", "content": "Hi"}])) == "user: Hi\nassistant:"  # no template
    assert t.token_strings()[t.encode("a")[0]] == "a"
    t.save(str(tmp_path))
    assert lm.Tokenizer.load(str(tmp_path)).encode(text) == ids


# -----------------------------------------------------------------------------
# Models and checkpoints


def small_model(arch: str, vocab: int = 300, d: int = 64, seed: int = 0):
    cfg = lm.ModelConfig(arch=arch, vocab_size=vocab, d_model=d, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=2 * d, max_seq_len=256)
    return lm.build_model(cfg, seed=seed).eval()


def test_build_model_deterministic_and_presets():
    a, b, c = small_model("qwen3", seed=1), small_model("qwen3", seed=1), small_model("qwen3", seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    n = {role: lm.param_count(lm.build_model(dataclasses.replace(cfg, vocab_size=1024)))
         for role, cfg in lm.MODEL_PRESETS["tiny"].items()}
    assert 1.5e6 < n["supervisor"] < 2.5e6 and n["worker"] * 2.5 < n["supervisor"]  # 2.0M vs 0.72M
    with pytest.raises(ValueError, match="vocab_size"):
        lm.build_model(lm.MODEL_PRESETS["smoke"]["worker"])


def test_checkpoint_atomic_and_plain_hf_load(tok, tmp_path):
    from transformers import AutoModelForCausalLM
    model = small_model("qwen3", vocab=tok.vocab_size)
    target = tmp_path / "ckpt"
    lm.save_checkpoint(str(target), small_model("llama", vocab=tok.vocab_size), tok, {"step": 0})
    lm.save_checkpoint(str(target), model, tok, {"step": 1})  # overwrites an existing checkpoint
    assert sorted(os.listdir(tmp_path)) == ["ckpt"], "no temp or aside dirs may be left behind"
    plain = AutoModelForCausalLM.from_pretrained(str(target)).eval()
    loaded, tok2 = lm.load_model(str(target))
    ids = torch.tensor([tok.encode(TEXTS[0])])
    with torch.no_grad():
        ref = model(ids).logits
        assert torch.equal(plain(ids).logits, ref) and torch.equal(loaded(ids).logits, ref)
    assert tok2.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    with open(target / "meta.json") as f:
        assert '"step": 1' in f.read()


def test_load_model_errors(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    # none of these may reach the network: each is refused before any download is tried
    for bad in [str(tmp_path / "missing"), str(tmp_path), "not a model name!", "ckpt/worker", "./nope"]:
        with pytest.raises(ValueError, match="save_checkpoint"):
            lm.load_model(bad)
    with pytest.raises(ValueError, match="dtype"):
        lm.load_model(str(tmp_path), dtype="float8")


# -----------------------------------------------------------------------------
# Rollout engine


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def model(request):
    return small_model(request.param)


PROMPTS = [[5, 17, 99, 3, 250], [42] * 3 + [7, 8, 9, 10, 11, 12, 13, 14], [201], [33, 66, 99, 132, 165, 198]]


def hf_greedy(model, prompts, max_new, eos=None):
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                             eos_token_id=eos, pad_token_id=0)
    rows = [row[P:].tolist() for row in out]
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def test_greedy_matches_hf_generate(model):
    ref = hf_greedy(model, PROMPTS, 16)
    assert lm.rollout(model, PROMPTS, 16, temperature=0).tokens == ref
    eos = ref[0][3]  # a token the model does emit, so prompt 0 must stop by step 4
    ref_eos = hf_greedy(model, PROMPTS, 16, eos=eos)
    out = lm.rollout(model, PROMPTS, 16, temperature=0, eos_token_id=eos)
    assert out.tokens == ref_eos and len(out.tokens[0]) <= 4
    assert out.finished == [eos in row for row in ref_eos]


def test_greedy_matches_hf_generate_explicit_head_dim():
    """Qwen3-0.6B has head_dim 128 != d_model / n_heads = 64; the cache and attention must follow head_dim."""
    cfg = lm.ModelConfig(arch="qwen3", vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1,
                         head_dim=16, d_ff=64, max_seq_len=128)
    m = lm.build_model(cfg, seed=0).eval()
    assert lm.rollout(m, PROMPTS, 8, temperature=0).tokens == hf_greedy(m, PROMPTS, 8)


def test_output_independent_of_batch_mates(model):
    batched = lm.rollout(model, PROMPTS, 12, temperature=0).tokens
    alone = [lm.rollout(model, [p], 12, temperature=0).tokens[0] for p in PROMPTS]
    assert batched == alone


def test_sampler_logprobs_match_teacher_forcing(model):
    """Also checks the shared prefill: every one of the G samples must see its prompt's KV rows."""
    for temperature in (1.0, 0.7):
        out = lm.rollout(model, PROMPTS, 10, temperature=temperature, num_samples=3, seed=0)
        prompts = [p for p in PROMPTS for _ in range(3)]
        forced, ents = lm.token_logprobs(model, prompts, out.tokens, temperature=temperature, return_entropy=True)
        for row, lp, ent, f, e in zip(out.tokens, out.logprobs, out.entropies, forced, ents):
            assert len(lp) == len(row) == f.shape[0]
            torch.testing.assert_close(torch.tensor(lp), f, atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.tensor(ent), e, atol=1e-4, rtol=0)
    assert out.prompt_lens == [len(p) for p in prompts]


def test_seed_reproducibility(model):
    a = lm.rollout(model, PROMPTS, 12, seed=1).tokens
    assert lm.rollout(model, PROMPTS, 12, seed=1).tokens == a
    assert lm.rollout(model, PROMPTS, 12, seed=2).tokens != a
    assert lm.rollout(model, PROMPTS, 12).tokens != lm.rollout(model, PROMPTS, 12).tokens


def test_num_samples_differ_from_one_prefill(model):
    """Regression: an engine that prefills once and replicates the cache must draw the FIRST token per row.
    Broadcasting one first-token draw to every sample of a prompt (a bug seen in nanochat) makes the
    G samples start identically; with a near-uniform random model they should almost never agree."""
    G = 4
    out = lm.rollout(model, PROMPTS, 8, temperature=1.0, num_samples=G, seed=0)
    assert len(out.tokens) == len(PROMPTS) * G
    for b in range(len(PROMPTS)):
        group = out.tokens[b * G:(b + 1) * G]
        assert len({tuple(s) for s in group}) == G
        assert len({s[0] for s in group}) > 1, "first tokens were broadcast across samples"


def test_eos_handling(model):
    kw = dict(temperature=1.0, num_samples=2, seed=3)
    free = lm.rollout(model, PROMPTS, 24, **kw).tokens
    eos = max(set(t for row in free for t in row), key=lambda t: sum(t in row for row in free))
    out = lm.rollout(model, PROMPTS, 24, eos_token_id=eos, **kw)
    assert any(out.finished)
    for row_free, row, lp, finished in zip(free, out.tokens, out.logprobs, out.finished):
        if eos in row_free:  # same trajectory up to and including the first EOS, nothing after
            assert row == row_free[: row_free.index(eos) + 1] and finished
        else:
            assert row == row_free and not finished
        assert len(lp) == len(row)
    # early exit: rows that all stop quickly do not run to max_new_tokens
    greedy = lm.rollout(model, PROMPTS[:1], 5, temperature=0).tokens[0]
    out = lm.rollout(model, PROMPTS[:1], 200, temperature=0, eos_token_id=[9999, greedy[0]])
    assert out.tokens == [greedy[:1]] and out.finished == [True]


def test_top_p_tiny_is_greedy(model):
    greedy = lm.rollout(model, PROMPTS, 10, temperature=0).tokens
    assert lm.rollout(model, PROMPTS, 10, temperature=1.0, top_p=1e-6, seed=5).tokens == greedy


def test_bf16_rollout_and_mode_restored():
    m = small_model("qwen3").to(torch.bfloat16).train()
    out = lm.rollout(m, PROMPTS, 8, temperature=0)
    assert [len(t) for t in out.tokens] == [8] * len(PROMPTS)
    out = lm.rollout(m, PROMPTS, 8, num_samples=2, seed=0)
    forced = lm.token_logprobs(m, [p for p in PROMPTS for _ in range(2)], out.tokens)
    for lp, f in zip(out.logprobs, forced):
        torch.testing.assert_close(torch.tensor(lp), f, atol=0.1, rtol=0)
    assert m.training, "rollout must restore the caller's train/eval mode"
    assert m.config._attn_implementation == "sdpa", "rollout must restore the attention implementation"


def test_token_logprobs_chunked_full_and_grad(model):
    prompts, comps = PROMPTS[:3], [[1, 2, 3], [], [4, 5, 6, 7, 8]]
    ref = lm.token_logprobs(model, prompts, comps)
    assert [r.shape[0] for r in ref] == [3, 0, 5]
    for a, b in zip(ref, lm.token_logprobs(model, prompts, comps, chunk_tokens=2)):
        torch.testing.assert_close(a, b)
    full = lm.token_logprobs(model, prompts, comps, return_full=True)
    for f, r, c in zip(full, ref, comps):
        assert f.shape == (len(c), 300)
        torch.testing.assert_close(f.logsumexp(-1), torch.zeros(len(c)), atol=1e-5, rtol=0)
        torch.testing.assert_close(f[torch.arange(len(c)), c], r)
    model.zero_grad()
    loss = -torch.cat(lm.token_logprobs(model, prompts, comps, chunk_tokens=2)).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_training_attention_eager_matches_sdpa(model, monkeypatch):
    """On CPU under grad hidden_states switches to plain (eager) attention, which is faster to
    backpropagate at these lengths; outputs and gradients must equal sdpa's, right padding
    included, and the model's attention setting must come back. In float64, so that only HF eager's
    float32 softmax separates the two (~1e-7 on outputs, <1e-4 of a gradient's scale); a masking or
    padding error would be O(1)."""
    model = copy.deepcopy(model).double()
    ids = [p + [0] * (11 - len(p)) for p in PROMPTS]
    ids_BT = torch.tensor(ids)
    mask_BT = torch.tensor([[1] * len(p) + [0] * (11 - len(p)) for p in PROMPTS])
    impl = model.config._attn_implementation
    outs = {}
    for limit in (0, lm.EAGER_MAX_SCORES):        # 0: never eager
        monkeypatch.setattr(lm, "EAGER_MAX_SCORES", limit)
        seen = []
        hook = model.model.layers[0].self_attn.register_forward_pre_hook(
            lambda m, a, kw: seen.append(m.config._attn_implementation), with_kwargs=True)
        model.zero_grad(set_to_none=True)
        h = lm.hidden_states(model, ids_BT, mask_BT)
        (h * mask_BT[..., None]).square().sum().backward()
        hook.remove()
        outs[limit] = (h.detach()[mask_BT.bool()], [p.grad.clone() for p in model.parameters()], seen[0])
        assert model.config._attn_implementation == impl
    (h0, g0, impl0), (h1, g1, impl1) = outs[0], outs[lm.EAGER_MAX_SCORES]
    assert impl0 == impl and impl1 == "eager"
    torch.testing.assert_close(h0, h1, atol=1e-6, rtol=1e-5)
    for a, b in zip(g0, g1):
        assert (a - b).abs().max() <= 1e-3 * a.abs().max()
    with torch.no_grad():                          # inference keeps the model's own attention
        seen = []
        hook = model.model.layers[0].self_attn.register_forward_pre_hook(
            lambda m, a, kw: seen.append(m.config._attn_implementation), with_kwargs=True)
        lm.hidden_states(model, ids_BT, mask_BT)
        hook.remove()
        assert seen == [impl]


def test_training_attention_under_grad_checkpointing(model):
    """Regression: with gradient checkpointing the backward recomputes the layers after
    hidden_states has returned; the attention must not be switched then (it raised)."""
    model = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(m.config._attn_implementation), with_kwargs=True)
    ids_BT = torch.tensor([p + [0] * (11 - len(p)) for p in PROMPTS])
    mask_BT = torch.tensor([[1] * len(p) + [0] * (11 - len(p)) for p in PROMPTS])
    lm.hidden_states(model, ids_BT, mask_BT).square().sum().backward()
    hook.remove()
    assert len(set(seen)) == 1 and seen[0] != "eager"
    assert all(p.grad is not None for p in model.model.layers[0].parameters())


def test_generate_text(tok):
    m = small_model("qwen3", vocab=tok.vocab_size)
    texts = lm.generate_text(m, tok, ["Where does Alice Moreau work?", "Hi"], max_new_tokens=6)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert texts[0] == lm.generate_text(m, tok, ["Where does Alice Moreau work?"], max_new_tokens=6)[0]


@slow
def test_compiled_decode_matches_eager():
    m = small_model("qwen3")
    eager = lm.rollout(m, PROMPTS, 12, temperature=0)
    compiled = lm.rollout(m, PROMPTS, 12, temperature=0, compile=True)
    assert compiled.tokens == eager.tokens
    # second call reuses the cache held on the model (stale K/V from the first call must not leak in)
    other = [p[::-1] for p in PROMPTS]
    again = lm.rollout(m, other, 12, temperature=0, compile=True)
    assert again.tokens == lm.rollout(m, other, 12, temperature=0).tokens
    a = lm.rollout(m, PROMPTS, 12, num_samples=2, seed=0)
    b = lm.rollout(m, PROMPTS, 12, num_samples=2, seed=0, compile=True)
    assert a.tokens == b.tokens
    for x, y in zip(a.logprobs, b.logprobs):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-4, rtol=0)
