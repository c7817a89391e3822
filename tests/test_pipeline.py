"""`python train.py --preset smoke` end to end, once per test session, then checks on what it
wrote: the report's schema and finite numbers, stage caching, user errors, and resumption."""
import json
import math
import os

import pytest
import torch

import train

KEYS = ["method", "family", "context_chars", "n", "accuracy", "cloud_in_tokens", "cloud_out_tokens",
        "edge_in_tokens", "edge_out_tokens", "cost_usd", "subcalls", "relay_tokens", "seconds"]


def test_report_has_every_method_with_finite_numbers(smoke_run):
    with open(os.path.join(smoke_run, "report.json")) as f:
        rep = json.load(f)
    methods = {r["method"] for r in rep["rows"]}
    for m in ["direct", "worker-direct", "rlm-cloud", "rlm-edge", "rlm-edge+fewshot", "rlm-edge+sft",
              "rlm-edge+sft-gold", "rlm-edge+opd", "rlm-edge+sft+opd", "rlm-edge+opd-self", "rlm-edge+rl-correct"]:
        assert m in methods, m
    assert any(m.startswith("rlm-edge+opd-gated") for m in methods)
    assert any(m.startswith("rlm-cascade(") for m in methods) and any(m.startswith("rlm-edge+abstain(") for m in methods)
    assert sum(m.startswith("rlm-edge+rl(lam=") for m in methods) == 3
    for r in rep["rows"]:
        for k in KEYS:
            assert k in r, (r["method"], k)
            if k not in ("method", "family"):
                assert math.isfinite(r[k]), (r["method"], k, r[k])
        assert 0.0 <= r["accuracy"] <= 1.0
    assert rep["main"] and rep["config"]["preset"] == "smoke"
    md = open(os.path.join(smoke_run, "report.md")).read()
    assert "| rlm-cloud |" in md and "held-out relay accuracy" in md
    rd = rep["stages"]["cascade"]["relay_deferral"]
    assert set(rd["signals"]) == {"random", "mean_entropy", "first_entropy", "mean_logprob", "min_logprob"}
    assert "relay-level deferral" in md and "## Teaching the worker" in md and "## Gatekeeper" in md
    assert "| opd | opd-self |" in md and "| sft | sft-gold |" in md
    for st in ("sft", "opd", "cascade"):
        for fig in rep["stages"][st]["figures"]:
            assert os.path.getsize(os.path.join(smoke_run, fig)) > 1000


def test_rerun_skips_finished_stages(smoke_run, capsys):
    assert train.main(["--preset", "smoke", "--out", smoke_run, "--quiet", "--stage", "eval"]) == 0
    assert "done already" in capsys.readouterr().out


def test_opd_counts_teacher_tokens_and_pretrain_reports_both_models(smoke_run):
    res = json.load(open(os.path.join(smoke_run, "opd", "result.json")))
    assert res["variants"]["opd"]["teacher_tokens"] > 0
    assert res["variants"]["opd-gated"]["teacher_tokens"] <= res["variants"]["opd"]["teacher_tokens"] * 4
    res = json.load(open(os.path.join(smoke_run, "pretrain", "result.json")))
    pre = res["models"]
    assert pre["supervisor"]["params"] > pre["worker"]["params"]
    assert "correct" not in pre["worker"]                       # per-chunk lists stay out of result.json
    assert all(0.0 <= pre[r]["false_fact_rate"] <= 1.0 for r in pre)
    gap = res["gap"]
    assert gap["mean"] == pytest.approx(pre["supervisor"]["relay_accuracy"] - pre["worker"]["relay_accuracy"])
    assert gap["ci95"][0] <= gap["mean"] <= gap["ci95"][1]
    assert "Supervisor minus worker" in open(os.path.join(smoke_run, "report.md")).read()


@pytest.mark.parametrize("a,b", [([1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 1]), ([1] * 5, [1] * 5), ([1, 0], [0, 1])])
def test_paired_gap_matches_a_float64_reference(a, b):
    import numpy as np
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    g = train.paired_gap(a, b)
    assert g["n"] == len(d) and g["mean"] == pytest.approx(d.mean())
    assert g["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])


@pytest.mark.parametrize("argv,needle", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--preset", "smoke", "--stage", "fly"], "unknown stage 'fly'"),
    (["--preset", "smoke", "--stage", "sft", "--out", "{tmp}/empty"], "--stage collect"),
    (["--preset", "smoke", "--stage", "pretrain", "--fsdp", "--out", "{tmp}/f"], "--optimizer adamw"),
])
def test_user_errors_are_one_line(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("optimizer,amp", [("adamw", None), ("muon", None), ("muon", torch.bfloat16)])
def test_fit_resumes_exactly(tmp_path, optimizer, amp):
    """An interrupted fit resumes from its state file and ends with the same weights as an
    uninterrupted one (batches are drawn from an RNG seeded by step; Muon's momentum and its
    AdamW groups' moments are in the state file; bfloat16 autocast is deterministic on the CPU)."""
    import distill
    import lm
    cfg = lm.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=64)
    data = [([1, 2, 3, i % 7 + 4], [i % 5 + 10, 11]) for i in range(50)]
    kw = dict(batch_size=4, lr=1e-2, warmup=1, seed=3, quiet=True, optimizer=optimizer, amp=amp)
    full = distill.fit(lm.build_model(cfg, seed=0), data, steps=6, **kw)
    state = str(tmp_path / "state.pt")
    distill.fit(lm.build_model(cfg, seed=0), data, steps=6, state_path=state, ckpt_every=3, **kw, )
    # simulate a kill after step 3: the state file holds step 3; a fresh model resumes from it
    st = torch.load(state, weights_only=False)
    assert st["step"] == 3
    resumed = distill.fit(lm.build_model(cfg, seed=1), data, steps=6, state_path=state, ckpt_every=3, **kw)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_fit_amp_runs_matmuls_in_bfloat16_and_keeps_float32_state():
    """--amp bfloat16: the same step as float32 up to bfloat16 rounding (close, not equal), with
    float32 weights and optimizer moments."""
    import distill
    import lm
    cfg = lm.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=64)
    data = [([1, 2, 3, i % 7 + 4, 5, 6], [i % 5 + 10, 11]) for i in range(50)]
    kw = dict(steps=1, batch_size=8, lr=1e-3, warmup=1, seed=0, quiet=True, prompt_weight=1.0)
    init = lm.build_model(cfg, seed=0)
    fp32 = distill.fit(lm.build_model(cfg, seed=0), data, **kw)
    bf16 = distill.fit(lm.build_model(cfg, seed=0), data, amp=torch.bfloat16, **kw)
    moved = differs = 0.0
    for p0, a, b in zip(init.parameters(), fp32.parameters(), bf16.parameters()):
        assert b.dtype == torch.float32
        moved = max(moved, (a - p0).abs().max().item())
        differs = max(differs, (a - b).abs().max().item())
    # AdamW's first step moves every weight by ~lr; bfloat16 rounding changes some signs of tiny
    # gradients, so a few weights move the other way (<= 2 lr) and none further
    assert moved > 0.5e-3 and 0 < differs <= 2.0e-3 + 1e-6


def test_pretrain_from_continues_the_models_of_another_run(smoke_run, tmp_path):
    from safetensors.torch import load_file
    out = str(tmp_path / "warm")
    assert train.main(["--preset", "smoke", "--out", out, "--quiet", "--threads", "1", "--stage", "pretrain",
                       "--pretrain-from", smoke_run, "--sup-steps", "2", "--worker-steps", "2", "--sup-tail-steps", "0"]) == 0
    res = json.load(open(os.path.join(out, "pretrain", "result.json")))
    src = json.load(open(os.path.join(smoke_run, "pretrain", "result.json")))
    for role in ("supervisor", "worker"):
        assert res["models"][role]["steps"] == src["models"][role]["steps"] + 2
        a, b = (load_file(os.path.join(d, "pretrain", role, "model.safetensors")) for d in (smoke_run, out))
        assert set(a) == set(b) and any(not torch.equal(a[k], b[k]) for k in a)   # trained on, same shapes
    assert open(os.path.join(out, "pretrain", "tokenizer", "tokenizer_tiktoken.json")).read() == \
        open(os.path.join(smoke_run, "pretrain", "tokenizer", "tokenizer_tiktoken.json")).read()


def test_supervisor_tail_is_a_warm_restart_on_the_none_heavy_mix(smoke_run, tmp_path):
    """The default supervisor = main phase + `--sup-tail-steps` on `--tail-none-share`: the same
    weights as stopping after the main phase and warm-restarting it (`--pretrain-from`) by hand,
    which is how the tail was measured (docs/LOG.md)."""
    from safetensors.torch import load_file
    res = json.load(open(os.path.join(smoke_run, "pretrain", "result.json")))["models"]["supervisor"]
    assert res["steps"] == 15 + 2 and res["main_phase"]["steps"] == 15
    assert 0 <= res["main_phase"]["false_fact_rate"] <= 1
    tailed, main_only, by_hand = (str(tmp_path / n) for n in ("tailed", "main", "by_hand"))
    common = ["--preset", "smoke", "--quiet", "--threads", "1", "--stage", "pretrain", "--worker-steps", "0"]
    assert train.main(common + ["--out", tailed]) == 0
    assert train.main(common + ["--out", main_only, "--sup-tail-steps", "0"]) == 0
    assert train.main(common + ["--out", by_hand, "--pretrain-from", main_only, "--sup-steps", "2",
                                "--relay-none-share", "0.9", "--sup-tail-steps", "0"]) == 0
    sup = "pretrain/supervisor/model.safetensors"
    a = load_file(os.path.join(tailed, "pretrain", "supervisor_main", "model.safetensors"))
    b = load_file(os.path.join(main_only, sup))
    assert all(torch.equal(a[k], b[k]) for k in a)          # the same main phase
    a, b = load_file(os.path.join(tailed, sup)), load_file(os.path.join(by_hand, sup))
    assert all(torch.equal(a[k], b[k]) for k in a)          # and the same tail
    c = load_file(os.path.join(main_only, sup))
    assert any(not torch.equal(a[k], c[k]) for k in a)      # which trained


def test_coincident_points_share_one_label(tmp_path):
    """Regression: rows that learnt the same thing printed their labels on top of each other."""
    import report
    pts = [("rlm-edge+opd", 0.00176, 0.035), ("rlm-edge+rl", 0.00176, 0.0350001), ("rlm-edge+sft", 0.00176, 0.040),
           ("rlm-cloud", 0.04, 0.035)]
    assert report.merge_coincident(pts) == [("rlm-edge+opd = +rl", 0.00176, 0.035), ("rlm-edge+sft", 0.00176, 0.040),
                                             ("rlm-cloud", 0.04, 0.035)]
    six = [(f"rlm-edge+m{i}", 0.0, 0.0) for i in range(6)]
    assert report.merge_coincident(six) == [("rlm-edge+m0 = +m1 = +m2 = +m3 (+2 more)", 0.0, 0.0)]
    assert os.path.getsize(report.plot_points(pts + six, str(tmp_path / "p.png"))) > 0


def test_report_lists_stage_times(smoke_run):
    """report.md says how long each stage took (the run-time target is checked from it)."""
    secs = {st: json.load(open(os.path.join(smoke_run, st, "result.json")))["seconds"] for st in train.STAGES}
    line = next(l for l in open(os.path.join(smoke_run, "report.md")) if l.startswith("Stage wall time"))
    for st, s in secs.items():
        assert f"{st} {s / 60:.1f}" in line
    assert f"total {sum(secs.values()) / 60:.1f}." in line


def test_same_seed_same_rows_in_another_process(smoke_run, tmp_path):
    """Same seed and thread count in a fresh process: the eval stage's rows repeat exactly. (The
    REPL's random string-hash seed once reordered the sub-calls of roots that iterate a set.)"""
    import shutil
    import subprocess
    import sys
    import torch
    again = tmp_path / "again"
    shutil.copytree(os.path.join(smoke_run, "pretrain"), again / "pretrain")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "train.py", "--preset", "smoke", "--out", str(again), "--stage", "eval", "--quiet",
                    "--threads", str(torch.get_num_threads())], cwd=root, check=True, timeout=600, capture_output=True)

    def rows(run):
        return [{k: v for k, v in r.items() if k != "seconds"}
                for r in json.load(open(os.path.join(run, "eval", "result.json")))["rows"]]
    assert rows(str(again)) == rows(smoke_run)
