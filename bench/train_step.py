"""Training-step speed of on-policy distillation and of GRPO on a random-init model: rollout
tokens/s, training tokens/s, peak memory and model FLOPs utilisation, phase by phase.

Run:
    python bench/train_step.py                                   # CPU, tiny worker shape, 2 steps
    python bench/train_step.py --shape qwen3-0.6b --device cuda --dtype bfloat16 --grad-ckpt
    bash bench/gpu.sh                                            # both Qwen3 shapes, one H100

One step of each method on synthetic prompts (random token ids of --prompt tokens; weights are
random, and speed does not depend on them): B prompts x G samples of --new tokens (EOS disabled,
so every row is full length), then
  opd: the teacher (a frozen copy of the student's shape) scores every sampled token, the student
       is trained on the sampled reverse KL (importance-sampling form), AdamW step;
  rl:  random rewards, group advantages, the GRPO clipped loss, AdamW step.
The first step of each method is a warm-up and is not timed. MFU counts 6 x parameters x tokens
through forward + backward (attention FLOPs left out) against --peak-tflops. JSON line last.

Not covered: a teacher larger than the student (pass --teacher-shape), LoRA, several GPUs.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distill  # noqa: E402
import lm  # noqa: E402
import rl_compress  # noqa: E402

SHAPES = {
    "tiny-worker": lm.ModelConfig(vocab_size=1024, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=384,
                                  max_seq_len=2048),
    "qwen3-0.6b": lm.ModelConfig(vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8,
                                 head_dim=128, d_ff=3072, max_seq_len=40960, rope_theta=1e6),
    "qwen3-1.7b": lm.ModelConfig(vocab_size=151936, d_model=2048, n_layers=28, n_heads=16, n_kv_heads=8,
                                 head_dim=128, d_ff=6144, max_seq_len=40960, rope_theta=1e6),
}

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--shape", default="tiny-worker", choices=list(SHAPES))
parser.add_argument("--teacher-shape", default=None, choices=list(SHAPES), help="default: the student's shape")
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
parser.add_argument("--batch", type=int, default=8, help="prompts per step (B)")
parser.add_argument("--samples", type=int, default=4, help="samples per prompt (G)")
parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
parser.add_argument("--new", type=int, default=32, help="sampled tokens per row")
parser.add_argument("--steps", type=int, default=2, help="timed steps per method (after one warm-up)")
parser.add_argument("--grad-ckpt", action="store_true")
parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100 SXM: 989)")
parser.add_argument("--threads", type=int, default=0)
args = parser.parse_args()
print(json.dumps(vars(args)))
if args.threads:
    torch.set_num_threads(args.threads)
device = torch.device(args.device)
dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]


def build(shape, seed):
    with device:
        m = lm.build_model(SHAPES[shape], seed=seed)
    return m.to(dtype)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


student = build(args.shape, 0)
if args.grad_ckpt:
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
teacher = build(args.teacher_shape or args.shape, 1).eval().requires_grad_(False)
opt = distill.make_optimizer(student, 1e-5, 0.0)
n_params = lm.param_count(student)
gen = torch.Generator().manual_seed(0)
V = SHAPES[args.shape].vocab_size
prompts = [torch.randint(10, min(V, 50_000), (args.prompt,), generator=gen).tolist() for _ in range(args.batch)]
G = args.samples


def sample(step):
    ro = lm.rollout(student, prompts, args.new, temperature=1.0, eos_token_id=None, pad_token_id=0,
                    num_samples=G, seed=step)
    p_ids = [prompts[k // G] for k in range(len(ro.tokens))]
    return ro, p_ids, [list(t) for t in ro.tokens]


def train_on(p_ids, comps, loss_fn):
    student.train()
    new_lp = torch.nn.utils.rnn.pad_sequence(lm.token_logprobs(student, p_ids, comps), batch_first=True)
    loss = loss_fn(new_lp)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    student.eval()
    return loss


def opd_step(step, t):
    t0 = time.perf_counter()
    ro, p_ids, comps = sample(step)
    sync()
    t1 = time.perf_counter()
    with torch.no_grad():
        t_lp = torch.nn.utils.rnn.pad_sequence(lm.token_logprobs(teacher, p_ids, comps), batch_first=True)
    sync()
    t2 = time.perf_counter()
    samp = torch.tensor(ro.logprobs, device=device)
    mask = torch.ones_like(samp)
    adv = -distill.sampled_reverse_kl(samp, t_lp.float(), mask)
    train_on(p_ids, comps, lambda new: distill.importance_sampling_loss(new, samp, adv, mask))
    sync()
    t3 = time.perf_counter()
    t["rollout"] += t1 - t0
    t["score"] += t2 - t1
    t["train"] += t3 - t2


def rl_step(step, t):
    t0 = time.perf_counter()
    ro, p_ids, comps = sample(step)
    sync()
    t1 = time.perf_counter()
    rewards_PG = torch.rand(args.batch, G, generator=gen)
    adv_PG, _ = rl_compress.group_advantages(rewards_PG)
    old = torch.tensor(ro.logprobs, device=device)
    mask = torch.ones_like(old)
    train_on(p_ids, comps, lambda new: rl_compress.grpo_loss(new, old, adv_PG.reshape(-1).to(device), mask)[0])
    sync()
    t2 = time.perf_counter()
    t["rollout"] += t1 - t0
    t["train"] += t2 - t1


rows = {}
gen_tokens = args.batch * G * args.new
train_tokens = args.batch * G * (args.prompt + args.new)
for name, fn in (("opd", opd_step), ("rl", rl_step)):
    fn(0, {"rollout": 0.0, "score": 0.0, "train": 0.0})  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = {"rollout": 0.0, "score": 0.0, "train": 0.0}
    for s in range(args.steps):
        fn(1 + s, t)
    n = args.steps
    row = {"rollout_tok_s": gen_tokens * n / t["rollout"], "train_tok_s": train_tokens * n / t["train"],
           "step_s": sum(t.values()) / n, "mfu_train": 6 * n_params * train_tokens * n / t["train"] / (args.peak_tflops * 1e12)}
    if t["score"]:
        row["teacher_tok_s"] = train_tokens * n / t["score"]
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    rows[name] = row
    print(f"{name}: " + "  ".join(f"{k} {v:,.3f}" if v < 10 else f"{k} {v:,.0f}" for k, v in row.items()))
print(json.dumps({"shape": args.shape, "params": n_params, "device": str(device), "dtype": args.dtype,
                  "grad_ckpt": args.grad_ckpt, **{f"{m}_{k}": round(v, 4) for m, r in rows.items() for k, v in r.items()}}))
