"""The real-model path without downloads: random-init Qwen3 and Llama checkpoints with a Hugging
Face tokenizer (chat template, a model vocabulary larger than the tokenizer's, as real Qwen
checkpoints have) saved to a directory and named by path."""
import json
import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

import lm
import tasks
import train

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def hf_tokenizer():
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    texts = [t.context for t in tasks.generate_tasks(2, "count", 5_000, seed=0)]
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = TEMPLATE
    return hf


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    hf = hf_tokenizer()
    common = dict(vocab_size=151_936, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=2048, eos_token_id=hf.eos_token_id,
                  pad_token_id=hf.pad_token_id)
    out = {}
    for name, (cfg_cls, model_cls, extra) in {"qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
                                              "llama": (LlamaConfig, LlamaForCausalLM, {})}.items():
        torch.manual_seed(0)
        model = model_cls(cfg_cls(**common, **extra))
        d = str(root / name)
        model.save_pretrained(d)
        hf.save_pretrained(d)
        out[name] = d
    return out


def test_load_and_chat_and_rollout(model_dirs):
    for d in model_dirs.values():
        model, tok = lm.load_model(d)
        assert tok.hf is not None and model.config.vocab_size > tok.vocab_size
        ids = tok.chat([{"role": "user", "content": "Who works at Bekuk Labs?"}])
        assert tok.decode(ids).startswith("<|im_start|>user")
        ro = lm.rollout(model, [ids, ids[:5]], 4, temperature=0.0, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        assert all(len(t) <= 4 for t in ro.tokens)


def test_eval_stage_runs_on_checkpoints_named_by_path(model_dirs, tmp_path):
    out = str(tmp_path / "run")
    argv = ["--preset", "smoke", "--out", out, "--stage", "eval", "--quiet", "--supervisor", model_dirs["qwen3"],
            "--worker", model_dirs["llama"], "--eval-n", "1", "--families", "needle,count", "--root-tokens", "16",
            "--relay-tokens", "4", "--answer-tokens", "4"]
    assert train.main(argv) == 0
    rows = json.load(open(os.path.join(out, "eval", "result.json")))["rows"]
    assert {r["method"] for r in rows} == {"direct", "worker-direct", "rlm-cloud", "rlm-edge"}
    # the planner root with a random worker: episodes run, sub-calls are billed to the edge
    argv += ["--root", "planner", "--force", "eval"]
    assert train.main(argv) == 0
    rows = json.load(open(os.path.join(out, "eval", "result.json")))["rows"]
    edge = [r for r in rows if r["method"] == "rlm-edge"]
    assert all(r["subcalls"] > 0 and r["edge_in_tokens"] > 0 for r in edge)


def test_every_stage_runs_on_checkpoints_named_by_path(model_dirs, tmp_path):
    # the whole study with a Qwen3-architecture supervisor and a Llama-architecture worker, both
    # with a 152k-row vocabulary: pretraining is skipped, every other stage trains and reports
    out = str(tmp_path / "all")
    argv = ["--preset", "smoke", "--out", out, "--quiet", "--supervisor", model_dirs["qwen3"], "--worker",
            model_dirs["llama"], "--eval-n", "1", "--families", "needle", "--root", "planner", "--root-tokens", "16",
            "--relay-tokens", "4", "--answer-tokens", "4", "--grad-ckpt", "--sft-steps", "2", "--opd-steps", "2",
            "--rl-steps", "2", "--lams", "0.1", "--gk-steps", "2", "--cascade-rates", "0.5"]
    assert train.main(argv) == 0
    assert not os.path.exists(os.path.join(out, "pretrain"))
    rep = json.load(open(os.path.join(out, "report.json")))
    for stage in ("eval", "collect", "fewshot", "sft", "rl", "opd", "gatekeeper", "cascade"):
        assert os.path.exists(os.path.join(out, stage, "result.json")), stage
    for stage in ("sft", "rl", "opd", "gatekeeper", "cascade"):
        assert stage in rep["stages"], stage
    methods = {r["method"] for r in rep["rows"]}
    assert {"rlm-edge+sft", "rlm-edge+opd", "rlm-edge+opd-self", "rlm-edge+rl(lam=0.1)"} <= methods
    # the trained workers keep the checkpoint's 152k-row vocabulary and load back by path
    model, tok = lm.load_model(os.path.join(out, "opd", "opd", "worker"))
    assert model.config.vocab_size == 151_936 and tok.hf is not None


def test_bad_model_names_are_one_line_errors(tmp_path, capsys):
    assert train.main(["--preset", "smoke", "--worker", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert train.main(["--preset", "smoke", "--worker", "./no/such/dir", "--out", str(tmp_path / "r")]) == 2
    assert "neither a local model directory nor a hub id" in capsys.readouterr().err
