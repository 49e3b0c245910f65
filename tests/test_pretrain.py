"""`polar-train pretrain` and `polar-train lm` end to end on a tiny generated world."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from polar_scaling.dist_env import free_port
from polar_scaling.rundir import read_jsonl

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def polar_train(stage, run_dir, *overrides, world=1):
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    if world == 1:
        cmd = [sys.executable, "-m", "polar_scaling.cli"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               f"--master_port={free_port()}", "-m", "polar_scaling.cli"]
    return subprocess.Popen(cmd + [stage, *overrides, "--run-dir", str(run_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def kill_tree(proc):
    """SIGKILL a launcher and every process under it (torchrun's workers included)."""
    import psutil

    parent = psutil.Process(proc.pid)
    for p in parent.children(recursive=True) + [parent]:
        p.send_signal(signal.SIGKILL)
    proc.communicate()


def kill_after_checkpoint_2(proc, run_dir):
    """SIGKILL a run as soon as its step-2 checkpoint is complete (mid-run, not at its end)."""
    marker = run_dir / "checkpoints" / "0000000002" / "COMPLETE"
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.01)
    kill_tree(proc)
    if (run_dir / "done.json").exists():
        pytest.fail("the run finished before it could be killed")


def rm_args(data, *extra):
    return [f"data.dir={data}", "model.size=t12k", "budget.tokens=2400", "batch.size=8",
            "optim.lr=3e-3", "schedule.progress=false", "schedule.eval_points=4",
            "schedule.checkpoint_every=2", "schedule.log_every=1", "data.eval_pairs=32", *extra]


def test_pretrain_writes_run_directory_and_metrics(tiny_dataset, tmp_path):
    run = tmp_path / "pt"
    code, out = finish(polar_train("pretrain", run, *rm_args(tiny_dataset)))
    assert code == 0, out
    for name in ("config.yaml", "metrics.jsonl", "ds_config.json", "done.json",
                 "eval_by_kl.json", "model/model.safetensors", "model/tokenizer.json"):
        assert (run / name).exists(), name
    rows = read_jsonl(run / "metrics.jsonl")
    train = [r for r in rows if "train_loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))
    assert all(b["tokens"] > a["tokens"] and b["flops"] > a["flops"]
               for a, b in zip(train, train[1:], strict=False))
    assert train[-1]["tokens"] >= 2400
    assert {"eval_accuracy", "eval_heldout_policies_loss",
            "eval_heldout_policies_accuracy"} <= evals[-1].keys()
    assert evals[-1]["step"] == train[-1]["step"]
    by_kl = json.loads((run / "eval_by_kl.json").read_text())
    assert sum(b["n"] for b in by_kl["eval"]) == 32
    from polar_scaling.model import RewardModel
    model = RewardModel.from_pretrained(run / "model")
    assert model.meta["reward_token_id"] == 4 and model.meta["stage"] == "pretrain"


@pytest.mark.parametrize("world,zero,packing", [(1, 0, "off"), (2, 2, "off"), (1, 0, "on")])
def test_pretrain_resume_after_sigkill_is_exact(tiny_dataset, tmp_path, world, zero, packing):
    args = rm_args(tiny_dataset, f"engine.zero_stage={zero}", f"batch.packing={packing}")
    if packing == "on":
        args.append("model.attention=polar_varlen")
    ref = tmp_path / "ref"
    code, out = finish(polar_train("pretrain", ref, *args, world=world))
    assert code == 0, out
    expected = read_jsonl(ref / "metrics.jsonl")
    cut = tmp_path / "cut"
    kill_after_checkpoint_2(polar_train("pretrain", cut, *args, world=world), cut)
    code, out = finish(polar_train("pretrain", cut, *args, world=world))
    assert code == 0, out
    got = read_jsonl(cut / "metrics.jsonl")
    assert len(got) == len(expected)
    for a, b in zip(expected, got, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-6, rel=0), (a["step"], k)


def assert_same_run(a, b, tol=1e-5):
    """Two run directories hold the same metrics and final weights, to ``tol``."""
    from safetensors.torch import load_file

    rows_a, rows_b = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert len(rows_a) == len(rows_b) and any("train_loss" in r for r in rows_a)
    for x, y in zip(rows_a, rows_b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], abs=tol, rel=0), (x["step"], k)
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() < tol, k


# A few steps. Adam's first update is lr * g / (|g| + eps): on the few weights whose gradient
# is near eps it magnifies float rounding (packing sums in another order), so lr is moderate.
PACKING_CHECK = ("budget.tokens=600", "optim.lr=5e-4")


@pytest.fixture(scope="module")
def padded_run(tiny_dataset, tmp_path_factory):
    from polar_scaling.pretrain import run

    path = tmp_path_factory.mktemp("padded") / "run"
    run(None, rm_args(tiny_dataset, *PACKING_CHECK, "batch.packing=off"), path)
    return path


@pytest.mark.parametrize("attention", ["sdpa", "polar_varlen"])
def test_packed_steps_equal_padded_steps(tiny_dataset, padded_run, tmp_path, attention,
                                         one_thread):
    from polar_scaling.pretrain import run

    done = run(None, rm_args(tiny_dataset, *PACKING_CHECK, "batch.packing=on",
                             f"model.attention={attention}"), tmp_path / "packed")
    padded = json.loads((padded_run / "done.json").read_text())
    assert done["packing"] and done["attention"] == attention and done["row_tokens"] == 32
    assert not padded["packing"] and padded["row_tokens"] is None
    assert done["steps"] == padded["steps"] >= 2
    assert done["pad_share_first_steps"] <= padded["pad_share_first_steps"]
    # no GPU here: a micro-batch is the whole step, as batch.micro unset always meant on CPU
    assert (done["micro"], done["micro_from"]) == (8, "batch.size / world (no GPU)")
    assert_same_run(padded_run, tmp_path / "packed")


def test_compiled_kernels_give_the_plain_run(tiny_dataset, padded_run, tmp_path, one_thread):
    """engine.fused_kernels reaches the engine and changes nothing but speed."""
    import torch
    from torch._dynamo.utils import counters

    from polar_scaling.pretrain import run

    torch._dynamo.reset()
    counters.clear()
    run(None, rm_args(tiny_dataset, *PACKING_CHECK, "batch.packing=off",
                      "engine.fused_kernels=compile_layers"), tmp_path / "fused")
    assert counters["stats"]["unique_graphs"] > 0  # the layers really ran compiled
    config = (tmp_path / "fused" / "config.yaml").read_text()
    assert "fused_kernels: compile_layers" in config
    assert_same_run(padded_run, tmp_path / "fused")


def test_bad_inputs_are_clear_errors(tiny_dataset, tmp_path):
    cases = [
        (["model.size=t9000"], "unknown model size 't9000'"),
        (["budget.tokens=5"], "smaller than one optimizer step"),
        (["budget.tokens=1e9"], "needs more data than the dataset holds"),
        ([f"data.dir={tmp_path / 'missing'}"], "not a trajectory dataset"),
        (["optim.lr=-1"], "optim.lr: expected a value > 0"),
        (["bogus=1"], "bogus: unknown key"),
        (["batch.packing=on", "batch.row_tokens=8"], "batch.row_tokens=8 is shorter than"),
        (["model.attention=flash"], "model.attention: expected one of ['auto', 'sdpa'"),
        (["batch.packing=off", "model.attention=polar_varlen"], "reads packed rows only"),
    ]
    for i, (extra, message) in enumerate(cases):
        args = rm_args(tiny_dataset) + extra
        code, out = finish(polar_train("pretrain", tmp_path / f"bad{i}", *args))
        assert code == 2 and message in out, (extra, out)
    # a run directory holding another config is refused and left untouched
    run = tmp_path / "taken"
    code, out = finish(polar_train("pretrain", run, *rm_args(tiny_dataset, "budget.tokens=800")))
    assert code == 0, out
    before = (run / "metrics.jsonl").read_text()
    code, out = finish(polar_train("pretrain", run, *rm_args(tiny_dataset, "seed=1",
                                                             "budget.tokens=800")))
    assert code == 2 and "holds a run with another config (differs in: seed)" in out
    assert (run / "metrics.jsonl").read_text() == before


def test_base_lm_then_reward_model_from_it(tiny_dataset, tmp_path):
    lm = tmp_path / "lm"
    code, out = finish(polar_train("lm", lm, f"data.dir={tiny_dataset}", "size=t12k",
                                   "data.seq_len=16", "data.eval_rows=8", "batch.size=4",
                                   "budget.tokens=640", "schedule.progress=false"))
    assert code == 0, out
    rows = read_jsonl(lm / "metrics.jsonl")
    assert any("lm_loss" in r for r in rows) and any("eval_lm_loss" in r for r in rows)
    assert (lm / "model" / "config.json").is_file()
    run = tmp_path / "rm"
    code, out = finish(polar_train("pretrain", run, *rm_args(tiny_dataset,
                                                             f"model.base={lm / 'model'}")))
    assert code == 0, out
    done = json.loads((run / "done.json").read_text())
    assert done["base"] == str(lm / "model")
    # a base of another shape is refused before training
    code, out = finish(polar_train("pretrain", tmp_path / "rm2", *rm_args(
        tiny_dataset, f"model.base={lm / 'model'}", "model.size=t25k")))
    assert code == 2 and "not that of size t25k" in out
    assert not (tmp_path / "rm2" / "metrics.jsonl").exists()


def test_lm_resume_after_sigkill_is_exact(tiny_dataset, tmp_path):
    args = [f"data.dir={tiny_dataset}", "size=t12k", "data.seq_len=16", "data.eval_rows=8",
            "batch.size=4", "budget.tokens=640", "schedule.progress=false",
            "schedule.checkpoint_every=2", "schedule.log_every=1"]
    ref = tmp_path / "ref"
    code, out = finish(polar_train("lm", ref, *args))
    assert code == 0, out
    cut = tmp_path / "cut"
    kill_after_checkpoint_2(polar_train("lm", cut, *args), cut)
    code, out = finish(polar_train("lm", cut, *args))
    assert code == 0, out
    expected, got = read_jsonl(ref / "metrics.jsonl"), read_jsonl(cut / "metrics.jsonl")
    assert len(got) == len(expected) and any("eval_lm_loss" in r for r in got)
    for a, b in zip(expected, got, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-6, rel=0), (a["step"], k)


def test_base_with_another_vocabulary_is_refused_before_training(tiny_dataset, tmp_path):
    from transformers import LlamaForCausalLM

    from polar_scaling.sizes import get_size, hf_config

    base = tmp_path / "base"
    LlamaForCausalLM(hf_config(get_size("t12k").with_vocab(99))).save_pretrained(base)
    run = tmp_path / "rm"
    code, out = finish(polar_train("pretrain", run, *rm_args(tiny_dataset,
                                                             f"model.base={base}")))
    assert code == 2 and "has vocab 99" in out
    assert not (run / "metrics.jsonl").exists()
    code, out = finish(polar_train("pretrain", tmp_path / "rm2", *rm_args(
        tiny_dataset, f"model.base={tmp_path / 'nowhere'}")))
    assert code == 2 and "is not a model folder" in out
