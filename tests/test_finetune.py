"""``polar-train finetune`` on tiny synthetic preferences: starts, metrics, export, bad input."""

import json

import pytest
import torch

from polar_scaling.config import ConfigError
from polar_scaling.errors import StageError
from polar_scaling.finetune import EpochSource, run
from polar_scaling.model import RewardModel
from polar_scaling.pairs import PairData
from polar_scaling.preferences import (
    public_row,
    read_preferences,
    split_by_prompt,
    synth_preferences,
    write_preferences,
)
from polar_scaling.rundir import read_jsonl
from polar_scaling.sizes import get_size, hf_config
from polar_scaling.tokenizer import content_char, load_tokenizer

FAST = ["schedule.progress=false", "schedule.eval_points=2", "batch.size=8", "model.size=t12k"]


@pytest.fixture(scope="module")
def prefs(tiny_dataset, tmp_path_factory):
    """Train and eval preference files of disjoint prompts from the tiny world; every other
    row carries a system prompt (conditional scoring)."""
    rows = synth_preferences(tiny_dataset, min_z=0.0, groups_per_prompt=3)
    for r in rows[::2]:
        r["system"] = content_char(0) + content_char(1)
    train, held = split_by_prompt(rows, 0.5)
    root = tmp_path_factory.mktemp("prefs")
    return (write_preferences([public_row(r) for r in train], root / "train.jsonl"),
            write_preferences([public_row(r) for r in held], root / "eval.jsonl"))


def data_args(prefs):
    return [f"data.train={prefs[0]}", f"data.eval={prefs[1]}"]


def save_reward_model(path, tokenizer, meta, seed=0):
    torch.manual_seed(seed)
    rm = RewardModel.from_config(hf_config(get_size("t12k").with_vocab(len(tokenizer)),
                                           pad_token_id=tokenizer.pad_token_id), meta)
    torch.nn.init.normal_(rm.score.weight, std=0.5)
    rm.save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return rm


def test_from_scratch_writes_metrics_and_a_model_evaluate_reads(tiny_dataset, prefs, tmp_path,
                                                                 one_thread):
    from polar_scaling.evaluate import evaluate_preferences

    out = run(None, data_args(prefs) + FAST + [f"model.tokenizer={tiny_dataset}", "epochs=2",
                                               "optim.lr=3e-3"], tmp_path / "ft")
    n_train = len(read_preferences(prefs[0]))
    assert out["train_pairs"] == n_train and out["epochs"] == 2
    assert out["steps"] == 2 * (n_train // 8)
    rows = read_jsonl(tmp_path / "ft" / "metrics.jsonl")
    evals = [r for r in rows if "eval_accuracy" in r]
    assert {"eval_loss", "eval_accuracy", "eval_noref_loss", "eval_noref_accuracy"} <= evals[-1].keys()
    assert evals[-1]["step"] == out["steps"]
    assert all(r["train_loss"] > 0 for r in rows if "train_loss" in r)

    model = RewardModel.from_pretrained(tmp_path / "ft" / "model").eval()
    assert model.meta["stage"] == "finetune" and model.meta["wrapper"] == "sft"
    tok = load_tokenizer(tmp_path / "ft" / "model")
    res = evaluate_preferences(model, tok, read_preferences(prefs[1]))
    # The evaluate stage scores exactly what the trainer's evaluation scored.
    assert res["with_reference"]["accuracy"] == pytest.approx(evals[-1]["eval_accuracy"], abs=1e-9)
    assert res["without_reference"]["loss"] == pytest.approx(evals[-1]["eval_noref_loss"],
                                                             rel=1e-5)
    by_cat = json.loads((tmp_path / "ft" / "eval_by_category.json").read_text())
    assert sum(c["n"] for c in by_cat["eval"].values()) == res["pairs"]
    for name, c in by_cat["eval"].items():
        assert c["accuracy"] == pytest.approx(res["by_category"][name]["with_reference"]["accuracy"])
    # A finished run directory returns its summary without training again.
    again = run(None, data_args(prefs) + FAST + [f"model.tokenizer={tiny_dataset}", "epochs=2",
                                                 "optim.lr=3e-3"], tmp_path / "ft")
    assert again == json.loads((tmp_path / "ft" / "done.json").read_text())


def test_reward_model_base_keeps_its_head_wrapper_and_limits(tiny_dataset, prefs, tmp_path,
                                                             one_thread):
    tok = load_tokenizer(tiny_dataset / "tokenizer")
    base = save_reward_model(tmp_path / "base", tok, {
        "reward_token_id": 4, "wrapper": "pretrain", "max_response_length": 5, "size": "t12k"})
    # A learning rate of ~0 leaves the weights as loaded: the head must be the base's.
    out = run(None, data_args(prefs) + FAST + [f"model.base={tmp_path / 'base'}",
                                               "optim.lr=1e-30"], tmp_path / "ft")
    assert out["wrapper"] == "pretrain"
    tuned = RewardModel.from_pretrained(tmp_path / "ft" / "model")
    for k, v in base.state_dict().items():
        assert torch.allclose(tuned.state_dict()[k], v, atol=1e-6), k
    assert tuned.meta["max_response_length"] == 5 and tuned.meta["wrapper"] == "pretrain"
    assert tuned.meta["base"] == str(tmp_path / "base")


def test_base_lm_start_gets_a_new_head(tiny_dataset, prefs, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny_dataset / "tokenizer")
    torch.manual_seed(1)
    lm = AutoModelForCausalLM.from_config(hf_config(get_size("t12k").with_vocab(len(tok)),
                                                    pad_token_id=tok.pad_token_id))
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(str(tmp_path / "lm"))
    run(None, data_args(prefs) + FAST + [f"model.base={tmp_path / 'lm'}", "optim.lr=1e-30"],
        tmp_path / "ft")
    tuned = RewardModel.from_pretrained(tmp_path / "ft" / "model")
    backbone = lm.model.state_dict()
    assert all(torch.allclose(tuned.model.state_dict()[k], v, atol=1e-6)
               for k, v in backbone.items())
    assert tuned.score.weight.shape == (1, lm.config.hidden_size)


def test_epoch_source_covers_every_epoch_in_a_new_order():
    import numpy as np

    # Pair i is recognisable by its first token i; lengths vary so bucketing has work to do.
    data = PairData([np.arange(i, i + 3 + i % 4) for i in range(20)],
                    [np.arange(i, i + 2 + i % 3) for i in range(20)])
    src = EpochSource(data, 3, 8, 4, 1, 0, lambda lens: float(sum(lens)), seed=0, bucket_steps=2)
    assert src.num_steps == 3 * 2 and (src.micro_batch, src.grad_accum) == (4, 2)
    epochs = []
    for e in range(3):
        firsts = []
        for s in range(2 * e, 2 * e + 2):
            mbs = src.micro_batches(s, 0, 1)
            assert [mb["input_ids"].shape[0] for mb in mbs] == [8, 8]  # 4 chosen + 4 rejected
            firsts += [int(mb["input_ids"][j, 0]) for mb in mbs for j in range(4)]
        assert len(set(firsts)) == 16  # whole batches, no pair twice in an epoch
        epochs.append(firsts)
    assert epochs[0] != epochs[1] != epochs[2]
    assert sum(src.step_tokens(s) for s in range(6)) == sum(
        p.step_tokens(s) for p in src.parts for s in range(2))
    assert src.step_flops(5) == src.parts[2].step_flops(1)
    with pytest.raises(StageError, match="fewer than one batch"):
        EpochSource(data, 1, 32, 32, 1, 0, lambda lens: 0.0, seed=0, bucket_steps=1)


def test_bad_input(tiny_dataset, prefs, tmp_path):
    with pytest.raises(ConfigError, match="data.train: required"):
        run(None, [f"data.eval={prefs[1]}", f"model.tokenizer={tiny_dataset}"], tmp_path / "a")
    with pytest.raises(ConfigError, match="model.tokenizer: required"):
        run(None, data_args(prefs), tmp_path / "b")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "reference": "", "chosen": "b",
                               "rejected": "c"}) + "\n")
    with pytest.raises(StageError, match=f"{bad}:1: empty reference"):
        run(None, [f"data.train={bad}", f"data.eval={prefs[1]}",
                   f"model.tokenizer={tiny_dataset}"] + FAST, tmp_path / "c")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(StageError, match=f"model.base {other}: cannot load"):
        run(None, data_args(prefs) + FAST + [f"model.base={other}"], tmp_path / "d")
    with pytest.raises(StageError, match="not a model folder"):
        run(None, data_args(prefs) + FAST + [f"model.base={tmp_path}"], tmp_path / "e")
    with pytest.raises(StageError, match="fewer than one batch"):
        run(None, data_args(prefs) + ["batch.size=4096", "model.size=t12k",
                                      f"model.tokenizer={tiny_dataset}"], tmp_path / "f")


def test_packed_step_equals_padded_step(tiny_dataset, prefs, tmp_path, one_thread):
    from safetensors.torch import load_file

    # One optimizer step over every whole micro-batch of 8 pairs (gradient accumulation).
    # Adam's first update is lr * g / (|g| + eps): on the few weights whose gradient is near
    # eps it magnifies float rounding (packing sums in another order), so keep lr moderate.
    pairs = 8 * (len(read_preferences(prefs[0])) // 8)
    args = data_args(prefs) + FAST + [f"model.tokenizer={tiny_dataset}", "optim.lr=5e-4",
                                      f"batch.size={pairs}", "batch.micro=8"]
    off = run(None, args + ["batch.packing=off"], tmp_path / "off")
    on = run(None, args + ["batch.packing=on", "model.attention=polar_varlen"], tmp_path / "on")
    assert on["packing"] and on["attention"] == "polar_varlen" and on["row_tokens"] >= 16
    assert not off["packing"] and off["attention"] == "sdpa"
    assert on["pad_share_first_steps"] <= off["pad_share_first_steps"]
    rows_off, rows_on = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("off", "on"))
    assert on["steps"] == 1 and pairs >= 16
    assert len(rows_on) == len(rows_off) and any("train_loss" in r for r in rows_on)
    for a, b in zip(rows_off, rows_on, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5, rel=0), (a["step"], k)
    w_off, w_on = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("off", "on"))
    for k in w_off:
        assert (w_off[k] - w_on[k]).abs().max().item() < 1e-5, k
    by_cat = [json.loads((tmp_path / d / "eval_by_category.json").read_text()) for d in ("off", "on")]
    for prefix in by_cat[0]:
        for name, c in by_cat[0][prefix].items():
            assert by_cat[1][prefix][name] == pytest.approx(c, abs=1e-9), (prefix, name)
