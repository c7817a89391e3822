"""Language models: tokenizers, model construction, checkpoints, and the rollout engine.

What: everything the project needs to turn text into tokens, build or load a causal LM (a tiny one
trained from scratch, or a Hugging Face checkpoint), and sample from it fast. The supervisor ("cloud")
and the worker ("edge") are both plain `transformers` causal LMs; this file never subclasses them.

How to run:
    python -m pytest -q tests/test_lm.py     # CPU, tiny random models, < 1 minute
    python bench/rollout.py                  # rollout() vs model.generate() tokens/s, JSON line last

The idea of the rollout engine in two lines (gpt-fast style): left-pad the prompts, prefill them
ONCE into a static KV cache sized prompt + max_new, copy the cache rows to the G samples, then run a
fixed-shape decode step that never talks to the host (sampling = argmax(probs / Exp(1) noise)).

Deliberately not covered:
  - beam search, repetition penalties, stop strings, min_new_tokens: only temperature and top_p.
  - paged / continuous batching: a batch runs until its slowest row ends (we check every 8 steps).
  - sliding-window attention caches (we refuse such configs rather than silently mis-mask).
  - HF tokenizers without a fast (Rust) backend in `Tokenizer.offsets`.
  - log-probs after top_p renormalisation: rollout log-probs are of softmax(logits / temperature).

During a rollout the model's attention is switched to `_gqa_decode_attention` (stock sdpa for the
prefill, a KV-copy-free grouped-query kernel for decoding) and switched back afterwards.

Shape legend (suffixes on tensor names): B prompts, G samples per prompt, N = B*G rows,
P padded prompt length, L KV-cache length (P + max_new), S padded sequence length (teacher forcing),
T completion tokens, M all completion tokens of a batch, C a chunk of them, V vocabulary,
D hidden size (head size inside attention), H heads, K KV heads, R = H/K query heads per KV head.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass

import tiktoken
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import (AttentionInterface, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM, StaticCache)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# -----------------------------------------------------------------------------
# Tokenizers

# GPT-2's pre-split, except that numbers are split into single digits (a year is 4 digit tokens, so
# copying a number never depends on how it happened to be merged). tiktoken runs this one at encode time.
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Python's `re` has no \p{..}: [^\W\d_] is "letters", \d "digits", (?:[^\s\w]|_) "other". Identical on
# ASCII (our corpus); on other scripts it only changes which merges are learnt, never the round trip.
_TRAIN_SPLIT = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = ["<|pad|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]


def train_bpe(texts: list[str], vocab_size: int) -> tiktoken.Encoding:
    """Byte-level BPE: 256 byte tokens, then merges, then SPECIAL_TOKENS; vocab_size counts all three.

    Merges are counted over the table of unique pre-tokens (a few thousand words), and the pair
    counts are updated incrementally, touching only the words that contain the merged pair.
    """
    n_target = vocab_size - len(SPECIAL_TOKENS)
    if n_target < 256:
        raise ValueError(f"vocab_size={vocab_size} is below 256 bytes + {len(SPECIAL_TOKENS)} special tokens")
    word_counts = Counter(piece for text in texts for piece in _TRAIN_SPLIT.findall(text))
    words = [list(w.encode("utf-8")) for w in word_counts]  # each unique pre-token as a list of token ids
    counts = list(word_counts.values())
    vocab = [bytes([i]) for i in range(256)]  # id -> bytes
    ranks = {b: i for i, b in enumerate(vocab)}  # bytes -> id (= tiktoken rank)
    pair_counts: Counter = Counter()
    where = defaultdict(set)  # pair -> indices of words that (may) contain it
    for wi, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += counts[wi]
            where[pair].add(wi)

    while len(vocab) < n_target and pair_counts:
        a, b = max(pair_counts, key=pair_counts.get)  # ties: first inserted, deterministic
        merged_bytes = vocab[a] + vocab[b]
        new = ranks.get(merged_bytes)
        if new is None:  # two merge paths can spell the same bytes: reuse the id, keep ranks contiguous
            new = ranks[merged_bytes] = len(vocab)
            vocab.append(merged_bytes)
        for wi in where.pop((a, b)):
            w, c = words[wi], counts[wi]
            for pair in zip(w, w[1:]):
                pair_counts[pair] -= c
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[wi] = out
            for pair in zip(out, out[1:]):
                pair_counts[pair] += c
                where[pair].add(wi)
    specials = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(f"rlm_bpe_{len(ranks) + len(specials)}", pat_str=SPLIT_PATTERN,
                             mergeable_ranks=ranks, special_tokens=specials)


class Tokenizer:
    """One small interface over a tiktoken Encoding (tiny models) or a Hugging Face tokenizer (hub models)."""

    def __init__(self, enc: tiktoken.Encoding | None = None, hf=None):
        assert (enc is None) != (hf is None), "pass exactly one of enc= (tiktoken) or hf= (transformers)"
        self.enc, self.hf = enc, hf
        if enc is not None:
            self.eos_id = enc.encode_single_token("<|eos|>")
            self.pad_id = enc.encode_single_token("<|pad|>")
            self.vocab_size = enc.n_vocab
        else:
            self.eos_id = hf.eos_token_id
            self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
            self.vocab_size = len(hf)
        self._strings = None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token text is encoded as ordinary text, never as a special id."""
        if self.enc is not None:
            return self.enc.encode_ordinary(text)
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids if i != self.pad_id and i != self.eos_id]
        if self.enc is not None:
            return self.enc.decode(ids, errors="replace")
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation [{"role", "content"}, ...], ready for the assistant to answer."""
        if self.enc is not None:  # <|role|>content, assistant turns closed by <|eos|>
            ids = []
            for m in messages:
                ids += [self.enc.encode_single_token(f"<|{m['role']}|>")] + self.encode(m["content"])
                if m["role"] == "assistant":
                    ids.append(self.eos_id)
            if add_generation_prompt:
                ids.append(self.enc.encode_single_token("<|assistant|>"))
            return ids
        if getattr(self.hf, "chat_template", None):
            ids = self.hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)  # no template: plain text
        return self.encode(text + ("assistant:" if add_generation_prompt else ""))

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """(start_byte, end_byte) in text.encode('utf-8') of each token of encode(text)."""
        if self.enc is not None:
            spans, start = [], 0
            for i in self.encode(text):
                end = start + len(self.enc.decode_single_token_bytes(i))
                spans.append((start, end))
                start = end
            return spans
        # HF gives character offsets; a byte-level token that splits a multi-byte character gets
        # the whole character, so neighbouring spans can overlap there.
        char_to_byte = [0]
        for ch in text:
            char_to_byte.append(char_to_byte[-1] + len(ch.encode("utf-8")))
        out = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return [(char_to_byte[s], char_to_byte[e]) for s, e in out["offset_mapping"]]

    def token_strings(self) -> list[str | None]:
        """The text of each id (None where the token is not valid UTF-8 on its own), to match vocabularies."""
        if self._strings is None:
            strings = []
            for i in range(self.vocab_size):
                if self.enc is not None:
                    try:
                        strings.append(self.enc.decode_single_token_bytes(i).decode("utf-8"))
                    except (KeyError, UnicodeDecodeError):
                        strings.append(None)
                else:
                    s = self.hf.decode([i], clean_up_tokenization_spaces=False)
                    strings.append(None if "\ufffd" in s else s)
            self._strings = strings
        return self._strings

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        if self.hf is not None:
            self.hf.save_pretrained(path)
            return
        ranks = {base64.b64encode(b).decode("ascii"): r for b, r in self.enc._mergeable_ranks.items()}
        blob = {"name": self.enc.name, "pat_str": self.enc._pat_str, "mergeable_ranks": ranks,
                "special_tokens": self.enc._special_tokens}
        with open(os.path.join(path, "tokenizer_tiktoken.json"), "w") as f:
            json.dump(blob, f)

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """A project tokenizer dir (tokenizer_tiktoken.json), an HF tokenizer dir, or a hub id."""
        tk = os.path.join(path, "tokenizer_tiktoken.json")
        if os.path.exists(tk):
            with open(tk) as f:
                blob = json.load(f)
            ranks = {base64.b64decode(b): r for b, r in blob["mergeable_ranks"].items()}
            return cls(enc=tiktoken.Encoding(blob["name"], pat_str=blob["pat_str"], mergeable_ranks=ranks,
                                             special_tokens=blob["special_tokens"]))
        return cls(hf=AutoTokenizer.from_pretrained(path))


# -----------------------------------------------------------------------------
# Models


@dataclass
class ModelConfig:
    arch: str = "qwen3"  # "qwen3" | "llama"
    vocab_size: int = 0  # 0 = fill in from the tokenizer: dataclasses.replace(cfg, vocab_size=tok.vocab_size)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 192
    max_seq_len: int = 512
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    head_dim: int | None = None  # None = d_model // n_heads (Qwen3-0.6B: 128 with d_model 1024, 16 heads)


MODEL_PRESETS = {
    "smoke": {
        "supervisor": ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=512),
        "worker": ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=96, max_seq_len=512),
    },
    "tiny": {  # ~2.0M and ~0.7M parameters with a 1024 vocabulary (a 5M supervisor, d256 x 6 layers,
               # needs ~50 minutes of pretraining on a 2-core CPU to learn retrieval; docs/LOG.md)
        "supervisor": ModelConfig(d_model=192, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=576, max_seq_len=1024),
        "worker": ModelConfig(d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=512),
    },
}


def build_model(cfg: ModelConfig, seed: int = 0):
    """A randomly initialised Qwen3ForCausalLM / LlamaForCausalLM; the same seed gives the same weights."""
    if cfg.vocab_size <= 0:
        raise ValueError("ModelConfig.vocab_size is unset: use dataclasses.replace(cfg, vocab_size=tok.vocab_size)")
    classes = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if cfg.arch not in classes:
        raise ValueError(f"unknown arch {cfg.arch!r}: use one of {sorted(classes)}")
    config_cls, model_cls = classes[cfg.arch]
    config = config_cls(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim or cfg.d_model // cfg.n_heads,
                        max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
                        tie_word_embeddings=cfg.tie_embeddings)
    with torch.random.fork_rng(devices=[]):  # do not disturb the caller's RNG stream
        torch.manual_seed(seed)
        return model_cls(config)


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # .parameters() counts tied weights once


def save_checkpoint(path: str, model, tokenizer: Tokenizer, meta: dict) -> None:
    """Write model (safetensors) + tokenizer + meta.json to `path` atomically.

    Everything goes to a temp dir next to `path`, then is renamed into place; an existing `path` is
    renamed aside first and removed last, so a crash never leaves a half-written checkpoint at `path`.
    The result also loads with plain transformers.AutoModelForCausalLM.from_pretrained(path).
    """
    import dist
    if dist.fsdp_modules(model):  # sharded: gather the full weights (all ranks) into a plain copy
        sd, _ = dist.full_state(model)
        if dist.is_main():
            plain = AutoModelForCausalLM.from_config(model.config)
            plain.load_state_dict(sd)
            model = plain
    if dist.is_main():  # under torchrun only rank 0 writes; the others wait, since they may load it next
        _write_checkpoint(path, model, tokenizer, meta)
    dist.barrier()


def _write_checkpoint(path, model, tokenizer, meta):
    path = os.path.abspath(path)
    model = getattr(model, "_orig_mod", model)  # save the uncompiled module
    for cfg in (model.config, model.generation_config):  # so model.generate() stops at our EOS
        cfg.eos_token_id, cfg.pad_token_id = tokenizer.eos_id, tokenizer.pad_id
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save(tmp)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2, default=str)
        aside = None
        if os.path.exists(path):
            aside = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(path, os.path.join(aside, name))
        os.rename(tmp, path)
        if aside is not None:
            shutil.rmtree(aside)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def load_model(name_or_dir: str, device: str = "cpu", dtype: str = "float32", grad_ckpt: bool = False):
    """(model in eval mode, Tokenizer) from a local checkpoint dir or a hub id (the only network path).
    grad_ckpt: recompute each layer's activations in backward (train mode only; rollouts unaffected)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: use one of {sorted(_DTYPES)}")
    path = os.path.expanduser(str(name_or_dir))
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ValueError(f"{path} has no config.json: pass a dir written by save_checkpoint or a HF model dir")
    elif (os.path.exists(path) or path.startswith((".", "/")) or not _HUB_ID.fullmatch(path)
          or os.path.isdir(path.split("/")[0])):  # "ckpt/worker" with a local ckpt/: a path, not a hub id
        raise ValueError(f"no model dir at {name_or_dir!r} and it is not a hub id: pass a checkpoint dir "
                         "written by save_checkpoint, or a hub id like 'Qwen/Qwen3-0.6B'")
    try:
        tok = Tokenizer.load(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype])
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not load {name_or_dir!r} ({first}): check the name/path, "
                         "and for a hub id that the network is reachable (HF_HUB_OFFLINE unset)") from e
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device).eval(), tok


# -----------------------------------------------------------------------------
# Rollout engine: every sample in the project is drawn here


@dataclass
class Rollout:
    tokens: list[list[int]]  # [N] new tokens, up to and including the first EOS; rows prompt-major
    logprobs: list[list[float]]  # [N] log-prob of each token under softmax(logits / temperature)
    entropies: list[list[float]]  # [N] entropy of that same distribution at each step
    prompt_lens: list[int]  # [N] prompt length of each row
    finished: list[bool]  # [N] True where the row hit EOS


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A float mask (0 = attend, dtype-min = masked) means the same to eager and sdpa attention.
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def _sample(logits_NV, noise_NV, temperature: float, top_p: float):
    """(token_N, logprob_N, entropy_N); noise_NV None = greedy.

    Log-probs and entropies are of softmax(logits / temperature) (of softmax(logits) when greedy);
    top_p only decides which tokens may be drawn, its renormalisation is not reflected in them.
    """
    logits_NV = logits_NV.float()
    if temperature > 0:
        logits_NV = logits_NV / temperature
    logp_NV = F.log_softmax(logits_NV, dim=-1)
    probs_NV = logp_NV.exp()
    entropy_N = -(probs_NV * logp_NV).sum(-1)
    if noise_NV is None:
        token_N = logits_NV.argmax(-1)
    else:
        if top_p < 1.0:  # nucleus: drop tokens whose higher-ranked mass already exceeds top_p
            sorted_NV, idx_NV = probs_NV.sort(-1, descending=True)
            drop_sorted_NV = (sorted_NV.cumsum(-1) - sorted_NV) > top_p
            probs_NV = probs_NV.masked_fill(drop_sorted_NV.scatter(-1, idx_NV, drop_sorted_NV), 0.0)
        # Does multinomial sampling without a host sync: argmax(p / E), E ~ Exp(1), draws from p
        token_N = (probs_NV / noise_NV).argmax(-1)
    logprob_N = logp_NV.gather(-1, token_N[:, None]).squeeze(-1)
    return token_N, logprob_N, entropy_N


def _gqa_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for one query token that never copies the KV cache: the R = H/K query heads sharing
    a KV head are stacked along the query axis, [N, H, 1, D] -> [N, K, R, D]. (HF's sdpa path
    materialises repeat_kv(cache), R times the cache, in every layer of every step once a mask is
    given.) Plain matmuls rather than sdpa: better for Inductor to codegen, and CPU sdpa kernels are
    slow for a query this short. Prefill (and only prefill has Q > 1 or no mask) goes to stock sdpa."""
    N, H, Q, D = query.shape
    if Q != 1 or attention_mask is None:  # prefill, from cache position 0: only the first P slots matter
        P = Q if attention_mask is None else attention_mask.shape[-1]  # mask [B, 1, P, P] or None (causal)
        return sdpa_attention_forward(module, query, key[:, :, :P], value[:, :, :P], attention_mask,
                                      scaling=scaling, dropout=dropout)
    q_NKRD = query.view(N, key.shape[1], H // key.shape[1], D)  # head h reads KV head h // R, as repeat_kv
    scores_NKRL = (q_NKRD @ key.transpose(-1, -2)) * (scaling or D ** -0.5) + attention_mask  # mask [N,1,1,L]
    probs_NKRL = scores_NKRL.float().softmax(-1).to(value.dtype)
    return (probs_NKRL @ value).reshape(N, 1, H, D), None  # [N, Q=1, H, D], the layout HF expects


AttentionInterface.register("rlm_gqa_decode", _gqa_decode_attention)  # rollout() switches to it, then back


def _decode_step(model, cache, token_N, pos_N, cache_pos_1, valid_NL, done_N, noise_NV,
                 temperature: float, top_p: float, eos_E, pad_id: int, mask_dtype: torch.dtype):
    """One token for every row. Fixed shapes, no host sync: this is the function torch.compile sees."""
    allowed_NL = valid_NL & (torch.arange(valid_NL.shape[1], device=valid_NL.device) <= cache_pos_1)
    logits_NV = model(input_ids=token_N[:, None], position_ids=pos_N[:, None], cache_position=cache_pos_1,
                      attention_mask=_additive_mask(allowed_NL, mask_dtype)[:, None, None, :],
                      past_key_values=cache, use_cache=True).logits[:, -1]
    token_N, logprob_N, entropy_N = _sample(logits_NV, noise_NV, temperature, top_p)
    token_N = torch.where(done_N, pad_id, token_N)  # finished rows keep emitting pad
    done_N = done_N | torch.isin(token_N, eos_E)
    return token_N, logprob_N, entropy_N, done_N, pos_N + 1, cache_pos_1 + 1  # new tensors: no input mutated


_COMPILED_STEPS = {}


def _compiled_step(device: torch.device):
    # CUDA graphs ("reduce-overhead") remove the per-kernel launch cost that dominates small-batch
    # decoding; on CPU the default inductor mode fuses the many small ops into a few C++ kernels.
    mode = "reduce-overhead" if device.type == "cuda" else None
    if mode not in _COMPILED_STEPS:
        _COMPILED_STEPS[mode] = torch.compile(_decode_step, mode=mode, fullgraph=True)
    return _COMPILED_STEPS[mode]


def _static_cache(model, n_rows: int, max_len: int, dtype, device, reuse: bool) -> StaticCache:
    """A [n_rows, K, max_len, head_dim] K/V buffer per layer, allocated once per rollout call.

    reuse=True (compiled decoding) keeps it on the model for the next call of the same shape: CUDA
    graphs are recorded against the cache's addresses, so a fresh cache would mean re-recording.
    Stale entries need no zeroing: prefill overwrites [0, P) and decoding only attends to <= its position.
    """
    cfg = model.config.get_text_config(decoder=True)
    key = (n_rows, max_len, dtype, str(device))
    held = getattr(model, "_rlm_static_cache", None)
    if reuse and held is not None and held[0] == key:
        return held[1]
    cache = StaticCache(config=cfg, max_cache_len=max_len)
    if any(layer.is_sliding for layer in cache.layers):
        raise NotImplementedError("sliding-window attention is not supported by rollout()")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache.early_initialization(n_rows, cfg.num_key_value_heads, head_dim, dtype, device)
    model._rlm_static_cache = (key, cache) if reuse else None
    return cache


@torch.inference_mode()
def rollout(model, prompt_ids: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
            top_p: float = 1.0, eos_token_id: int | list[int] | None = None, pad_token_id: int = 0,
            num_samples: int = 1, seed: int | None = None, compile: bool = False) -> Rollout:
    """Sample `num_samples` completions for each prompt (temperature 0 = greedy); see Rollout for fields.

    Same seed, same batch -> same samples; seed None -> fresh randomness. With compile=True the decode
    step is torch.compile'd (a new batch size or cache length recompiles; the length is rounded up to
    a multiple of 64 to limit that) and the KV cache is kept on the model for the next call.
    """
    assert prompt_ids and all(len(p) > 0 for p in prompt_ids), "every prompt needs at least one token"
    assert max_new_tokens >= 1 and num_samples >= 1
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    B, G = len(prompt_ids), num_samples
    N = B * G
    P = max(len(p) for p in prompt_ids)
    L = P + max_new_tokens
    if compile:
        L = -(-L // 64) * 64
    eos_list = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else [*eos_token_id]
    eos_E = torch.tensor(eos_list, dtype=torch.long, device=device)
    gen = None
    if temperature > 0:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed) if seed is not None else gen.seed()

    # Left padding: every prompt ends at column P-1, so all rows decode at the same cache position.
    ids_BP = torch.tensor([[pad_token_id] * (P - len(p)) + list(p) for p in prompt_ids], device=device)
    valid_BP = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompt_ids], device=device)
    pos_BP = (valid_BP.long().cumsum(-1) - 1).clamp(min=0)  # padding does not shift positions
    valid_BL = torch.cat([valid_BP, valid_BP.new_ones(B, L - P)], dim=1)
    cache_pos_P = torch.arange(P, device=device)
    # prefill mask [B, 1, P, P]: causal and not padding; None (= plain causal) when nothing is padded
    allowed_BPP = valid_BP[:, None, :] & (cache_pos_P[None, :] <= cache_pos_P[:, None])
    prefill_mask = None if all(len(p) == P for p in prompt_ids) else _additive_mask(allowed_BPP, dtype)[:, None]

    was_training, attn_impl = model.training, model.config._attn_implementation
    model.eval()
    model.config._attn_implementation = "rlm_gqa_decode"  # restored below
    try:
        cache = _static_cache(model, N, L, dtype, device, reuse=compile)
        # Prefill the B prompts once, into the sample-0 rows of the [N = B*G] cache (strided views)...
        full_kv = [(layer.keys, layer.values) for layer in cache.layers]
        for layer, (k, v) in zip(cache.layers, full_kv):
            layer.keys, layer.values = k.unflatten(0, (B, G))[:, 0], v.unflatten(0, (B, G))[:, 0]
        logits_BV = model(input_ids=ids_BP, position_ids=pos_BP, cache_position=cache_pos_P,
                          attention_mask=prefill_mask, past_key_values=cache, use_cache=True,
                          logits_to_keep=1).logits[:, -1]
        # ...then copy those rows to the other G-1 samples of each prompt.
        for layer, (k, v) in zip(cache.layers, full_kv):
            for x in (k, v):
                x_BG = x.unflatten(0, (B, G))
                x_BG[:, 1:, :, :P] = x_BG[:, :1, :, :P]
            layer.keys, layer.values = k, v

        V = logits_BV.shape[-1]

        def noise():  # [N, V] Exp(1) draws, fresh per step; None when greedy
            return None if gen is None else torch.empty(N, V, device=device).exponential_(generator=gen)

        # The first token is drawn per row with its own noise (broadcasting one draw to all G samples
        # of a prompt is a known bug in other engines; tests check that samples differ).
        token_N, logprob_N, entropy_N = _sample(logits_BV.repeat_interleave(G, 0), noise(), temperature, top_p)
        done_N = torch.isin(token_N, eos_E)
        tokens, logprobs, entropies = [token_N], [logprob_N], [entropy_N]

        valid_NL = valid_BL.repeat_interleave(G, 0)
        pos_N = (pos_BP[:, -1] + 1).repeat_interleave(G)  # next position = prompt length
        cache_pos_1 = torch.tensor([P], device=device)
        step = _compiled_step(device) if compile else _decode_step
        for t in range(1, max_new_tokens):
            if eos_list and t % 8 == 0 and bool(done_N.all()):  # the only host sync: early exit
                break
            # Guards were checked on the first compiled call; the rest of the loop has the same shapes and
            # constants, so skip re-evaluating them (~0.5 ms a step on CPU for an HF model's guards).
            with torch.compiler.set_stance(skip_guard_eval_unsafe=compile and t > 1):
                out = step(model, cache, token_N, pos_N, cache_pos_1, valid_NL, done_N, noise(),
                           temperature, top_p, eos_E, pad_token_id, dtype)
            if compile and device.type == "cuda":  # CUDA-graph outputs are overwritten by the next replay
                out = [x.clone() for x in out]
            token_N, logprob_N, entropy_N, done_N, pos_N, cache_pos_1 = out
            tokens.append(token_N)
            logprobs.append(logprob_N)
            entropies.append(entropy_N)
    finally:
        model.train(was_training)
        model.config._attn_implementation = attn_impl

    tokens_NT = torch.stack(tokens, 1).tolist()
    logprobs_NT = torch.stack(logprobs, 1).tolist()
    entropies_NT = torch.stack(entropies, 1).tolist()
    eos_set = set(eos_list)
    res = Rollout([], [], [], [len(p) for p in prompt_ids for _ in range(G)], [])
    for toks, lps, ents in zip(tokens_NT, logprobs_NT, entropies_NT):
        end = next((i + 1 for i, tok in enumerate(toks) if tok in eos_set), len(toks))
        res.tokens.append(toks[:end])
        res.logprobs.append(lps[:end])
        res.entropies.append(ents[:end])
        res.finished.append(toks[end - 1] in eos_set)
    return res


EAGER_MAX_SCORES = 2 ** 24  # attention scores per layer (64 MB of float32) below which CPU training uses eager


def hidden_states(model, ids_BT, mask_BT):
    """The trunk's last hidden states [B, T, D] (after the final norm); callers apply the lm_head
    in chunks. A model sharded by dist.fsdp_wrap goes through its registered FSDP forward method,
    so that its root weights are gathered."""
    impl = model.config._attn_implementation
    B, T = ids_BT.shape
    # Training on CPU: HF's sdpa path runs a flash-attention kernel whose backward is ~3x slower than
    # plain matmul attention at these short lengths (a tiny pretraining step: 1.25x faster overall,
    # docs/LOG.md). Plain attention keeps [B, H, T, T] scores for backward, so only while they are small;
    # never under gradient checkpointing, whose recompute in backward runs after the switch is undone.
    if (impl == "sdpa" and torch.is_grad_enabled() and ids_BT.device.type == "cpu"
            and not getattr(model, "is_gradient_checkpointing", False)
            and B * model.config.num_attention_heads * T * T <= EAGER_MAX_SCORES):
        model.config._attn_implementation = "eager"
    try:
        if hasattr(model, "fsdp_hidden"):
            return model.fsdp_hidden(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False)
        return model.model(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False).last_hidden_state
    finally:
        model.config._attn_implementation = impl


def token_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                   chunk_tokens: int | None = None, temperature: float = 1.0,
                   return_full: bool = False, return_entropy: bool = False):
    """Teacher-forced log-probs of each completion given its prompt, under softmax(logits / temperature).

    Returns one float32 tensor per row: [T] log-probs of the given tokens, or with return_full=True
    the whole [T, V] log-prob rows (for distillation on small vocabularies). With return_entropy=True
    returns (that list, list of [T] entropies). Differentiable: the caller picks grad / no_grad.

    Memory: the lm_head + log_softmax run over chunks of `chunk_tokens` completion positions (default:
    ~64 MB of float32 logits per chunk), never over [batch, length, vocab]; under grad each chunk is
    recomputed in backward (activation checkpointing), so only the hidden states are kept.
    """
    param = next(model.parameters())
    assert len(prompt_ids) == len(completion_ids)
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    S = max(len(s) for s in seqs)
    ids_BS = torch.tensor([s + [0] * (S - len(s)) for s in seqs], device=param.device)  # right padding
    mask_BS = torch.tensor([[1] * len(s) + [0] * (S - len(s)) for s in seqs], device=param.device)
    hidden_BSD = hidden_states(model, ids_BS, mask_BS)
    # hidden state at position j predicts token j+1: completion token i of row b is predicted at len(p)+i-1
    rows_M = torch.tensor([b for b, c in enumerate(completion_ids) for _ in c], dtype=torch.long)
    cols_M = torch.tensor([len(p) - 1 + i for p, c in zip(prompt_ids, completion_ids) for i in range(len(c))],
                          dtype=torch.long)
    targets_M = torch.tensor([t for c in completion_ids for t in c], dtype=torch.long, device=param.device)
    hidden_MD = hidden_BSD[rows_M.to(param.device), cols_M.to(param.device)]

    def chunk_fn(h_CD, tgt_C):
        logits_CV = model.lm_head(h_CD).float()
        logp_CV = F.log_softmax(logits_CV / temperature if temperature > 0 else logits_CV, dim=-1)
        entropy_C = -(logp_CV.exp() * logp_CV).sum(-1)
        return (logp_CV if return_full else logp_CV.gather(-1, tgt_C[:, None]).squeeze(-1)), entropy_C

    M, V = targets_M.shape[0], model.lm_head.out_features
    chunk = chunk_tokens or max(1, 2 ** 24 // V)
    use_ckpt = torch.is_grad_enabled() and hidden_MD.requires_grad and not return_full
    outs, ents = [], []
    for s in range(0, M, chunk):
        args = (hidden_MD[s:s + chunk], targets_M[s:s + chunk])
        out, ent = checkpoint(chunk_fn, *args, use_reentrant=False) if use_ckpt else chunk_fn(*args)
        outs.append(out)
        ents.append(ent)
    sizes = [len(c) for c in completion_ids]
    empty = hidden_MD.new_zeros((0, V) if return_full else (0,), dtype=torch.float32)
    values = list((torch.cat(outs) if outs else empty).split(sizes))
    if not return_entropy:
        return values
    return values, list((torch.cat(ents) if ents else empty.new_zeros(0)).split(sizes))


def generate_text(model, tok: Tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
                  seed: int | None = None, chat: bool = True) -> list[str]:
    """Convenience: each prompt as one user message (or raw text with chat=False) -> completion text."""
    ids = [tok.chat([{"role": "user", "content": p}]) if chat else tok.encode(p) for p in prompts]
    out = rollout(model, ids, max_new_tokens, temperature=temperature, eos_token_id=tok.eos_id,
                  pad_token_id=tok.pad_id, seed=seed)
    return [tok.decode(t) for t in out.tokens]
