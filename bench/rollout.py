"""Rollout engine speed: lm.rollout() vs Hugging Face model.generate(), same model, same process.

Run:
    python bench/rollout.py                          # CPU, tiny worker shape, float32
    python bench/rollout.py --no-compile             # eager decode step only
    bash bench/gpu.sh                                # CUDA bf16, Qwen3-0.6B shape, batch 64

Both engines decode greedily from random prompt ids with EOS disabled, so each emits exactly --new
tokens per row; tok/s = batch * new / wall time (prefill included). Every engine is warmed up untimed
(the compiled one includes compilation, reported separately), then the runs are interleaved and the
best of --repeats is reported (best, not median: on a shared CPU other jobs only ever add time).
Achieved GB/s is for our decode phase: (weight bytes + live KV bytes read per step) / step time, the
step time being (full run - prefill-only run) / (new - 1). Human lines first, a JSON line last.
On a CPU shared with other jobs, --threads 1 gives steadier numbers (OpenMP threads that wait on a
busy core make 2-thread runs 10x slower at random).

Not covered: real checkpoints (weights are random: speed does not depend on them), sampling at
temperature > 0, long contexts, HF generate with its own static cache / compile.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lm  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--device", default="cpu", help="cpu | cuda")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
parser.add_argument("--batch", type=int, default=32, help="prompts per batch")
parser.add_argument("--prompt", type=int, default=128, help="prompt length in tokens")
parser.add_argument("--new", type=int, default=64, help="new tokens per row")
parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the torch.compile'd decode step (eager is always timed)")
parser.add_argument("--preset-shape", default="tiny-worker", choices=["tiny-worker", "qwen3-0.6b"])
parser.add_argument("--repeats", type=int, default=5, help="timed runs per engine (best reported)")
parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
parser.add_argument("--peak-gbs", type=float, default=0.0, help="memory bandwidth of the card, for a %% line")
args = parser.parse_args()
print(json.dumps(vars(args)))
if args.threads:
    torch.set_num_threads(args.threads)

SHAPES = {
    "tiny-worker": dataclasses.replace(lm.MODEL_PRESETS["tiny"]["worker"], vocab_size=1024),
    "qwen3-0.6b": lm.ModelConfig(arch="qwen3", vocab_size=151936, d_model=1024, n_layers=28, n_heads=16,
                                 n_kv_heads=8, head_dim=128, d_ff=3072, max_seq_len=40960, rope_theta=1e6),
}
device = torch.device(args.device)
dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
cfg = SHAPES[args.preset_shape]
with device:  # build directly on the device (a 0.6B float32 init on CPU would take a while)
    model = lm.build_model(cfg, seed=0)
model = model.to(dtype).eval()
n_params = lm.param_count(model)
if device.type == "cuda":
    device_name = torch.cuda.get_device_name(device)
else:
    device_name = f"cpu ({torch.get_num_threads()} threads)"
print(f"model: {args.preset_shape} {n_params / 1e6:.1f}M params, {args.dtype}, on {device_name}")

gen = torch.Generator().manual_seed(0)
prompts = torch.randint(1, cfg.vocab_size, (args.batch, args.prompt), generator=gen).tolist()
ids_BP = torch.tensor(prompts, device=device)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_generate(new=args.new):
    with torch.inference_mode():
        out = model.generate(input_ids=ids_BP, attention_mask=torch.ones_like(ids_BP), do_sample=False,
                             max_new_tokens=new, eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == args.prompt + new
    return out


def run_ours(compile, new=args.new):
    out = lm.rollout(model, prompts, new, temperature=0.0, eos_token_id=None, compile=compile)
    assert all(len(t) == new for t in out.tokens)
    return out


def timed(fn):
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


engines = {"generate": run_generate, "eager": lambda: run_ours(False)}
if args.compile:
    engines["compiled"] = lambda: run_ours(True)
warmup = {name: timed(fn) for name, fn in engines.items()}  # untimed for the results
# Same tokens as generate? Exact in float32; in bf16 rounding differences between attention kernels
# can flip a near-tie and the rows diverge from there, so count the rows that match exactly.
ref = run_generate()[:, args.prompt:].tolist()
agree = {name: sum(a == b for a, b in zip(run_ours(name == "compiled").tokens, ref))
         for name in engines if name != "generate"}
times = {name: [] for name in engines}
for _ in range(args.repeats):  # interleaved, so background load hits every engine alike
    for name, fn in engines.items():
        times[name].append(timed(fn))
tok_s = {name: args.batch * args.new / min(ts) for name, ts in times.items()}
for name in engines:
    extra = f", warm-up {warmup[name]:.1f} s" if name == "compiled" else ""
    match = "" if name == "generate" else f", rows == generate: {agree[name]}/{args.batch}"
    print(f"{name:>9}: {tok_s[name]:9.1f} tok/s (runs: {', '.join(f'{t:.3f}' for t in times[name])} s{extra}{match})")

# decode-phase bandwidth of our best engine: (weights + live KV read per step) / step time
best = "compiled" if args.compile else "eager"
prefill_s = min(timed(lambda: run_ours(best == "compiled", new=1)) for _ in range(args.repeats))
step_s = (min(times[best]) - prefill_s) / max(args.new - 1, 1)
elt = torch.finfo(dtype).bits // 8
head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
kv_bytes = 2 * cfg.n_layers * args.batch * cfg.n_kv_heads * head_dim * elt * (args.prompt + args.new / 2)
step_bytes = n_params * elt + kv_bytes  # tied embeddings: the lm_head reads the whole table each step
gbs = step_bytes / step_s / 1e9 if step_s > 0 else None
if gbs is None:  # noise: the prefill-only runs took longer than the best full run
    print(f"{best} decode step: n/a (prefill-only run {prefill_s:.3f} s >= full run; rerun on a quieter machine)")
else:
    print(f"{best} decode step: {step_s * 1e3:.2f} ms, reads {step_bytes / 1e9:.3f} GB "
          f"(weights {n_params * elt / 1e9:.3f} + KV {kv_bytes / 1e9:.3f}) -> {gbs:.1f} GB/s"
          + (f" = {100 * gbs / args.peak_gbs:.1f}% of {args.peak_gbs:.0f} GB/s peak" if args.peak_gbs else ""))
print(f"ratio ours/generate: {tok_s[best] / tok_s['generate']:.2f}x ({best}), "
      f"{tok_s['eager'] / tok_s['generate']:.2f}x (eager)")
print(json.dumps({"bench": "rollout", "device": device_name, "dtype": args.dtype, "shape": args.preset_shape,
                  "batch": args.batch, "prompt": args.prompt, "new": args.new,
                  "ours_tok_s": round(tok_s[best], 1), "generate_tok_s": round(tok_s["generate"], 1),
                  "ratio": round(tok_s[best] / tok_s["generate"], 2), "compiled": args.compile,
                  "eager_tok_s": round(tok_s["eager"], 1),
                  "compile_warmup_s": round(warmup["compiled"], 1) if args.compile else None,
                  "decode_step_ms": round(step_s * 1e3, 3) if gbs else None,
                  "decode_gb_s": round(gbs, 1) if gbs else None,
                  "rows_match_generate": agree[best]}))
