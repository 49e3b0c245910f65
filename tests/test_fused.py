"""Fused kernels compute the same rewards and gradients as the plain model (CPU: compile)."""

from __future__ import annotations

import copy

import pytest
import torch

from polar_scaling.fused import FUSED_KERNELS, fuse_kernels
from polar_scaling.model import RewardModel
from polar_scaling.packed_attention import VARLEN, packed_inputs, use_attention
from polar_scaling.packing import pack_sequences
from polar_scaling.sizes import get_size, hf_config

VOCAB, PAD = 61, 0
LENGTHS = [9, 3, 14, 6, 1, 11]


def make_model():
    torch.manual_seed(0)
    m = RewardModel.from_config(hf_config(get_size("t12k").with_vocab(VOCAB), pad_token_id=PAD))
    torch.nn.init.normal_(m.score.weight, std=1.0)
    return m


def packed_batch():
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    return pack_sequences(seqs, 16, PAD)


def rewards_and_grads(model, batch, impl):
    use_attention(model, impl)
    model.zero_grad(set_to_none=True)
    rewards = model(**packed_inputs(batch, impl))
    (rewards.square().sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return rewards.detach(), grads


# Compiling on CPU takes tens of seconds, so each way is checked with one kernel.
@pytest.mark.parametrize(("how", "impl"), [("compile", "sdpa"), ("compile_layers", VARLEN)])
def test_compiled_kernels_match_plain(how, impl):
    torch._dynamo.reset()
    plain = make_model()
    fused = fuse_kernels(copy.deepcopy(plain), how)
    batch = packed_batch()
    want_r, want_g = rewards_and_grads(plain, batch, impl)
    got_r, got_g = rewards_and_grads(fused, batch, impl)
    torch.testing.assert_close(got_r, want_r, rtol=1e-5, atol=1e-5)
    assert want_g.keys() == got_g.keys() and len(want_g) > 10
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-4, atol=1e-5, msg=name)
    # The fusion really happened: the modules now run through torch.compile.
    layer = fused.model.layers[0]
    target = layer.mlp if how == "compile" else layer
    assert target._compiled_call_impl is not None


def test_none_leaves_the_model_alone_and_bad_names_are_refused():
    m = make_model()
    assert fuse_kernels(m, "none") is m
    assert all(layer._compiled_call_impl is None for layer in m.model.layers)
    assert all(layer.mlp._compiled_call_impl is None for layer in m.model.layers)
    with pytest.raises(ValueError, match="unknown fused kernels 'fast'"):
        fuse_kernels(m, "fast")
    assert set(FUSED_KERNELS) == {"auto", "none", "compile", "compile_layers", "liger"}


def test_auto_is_liger_on_cuda_only_where_installed(monkeypatch):
    import importlib.util

    from polar_scaling import fused

    real = importlib.util.find_spec
    assert fused.resolve_fused("compile", "cuda") == "compile"
    assert fused.resolve_fused("auto", "cpu") == "none"
    monkeypatch.setattr(fused.importlib.util, "find_spec",
                        lambda name: object() if name in ("liger_kernel", "triton") else real(name))
    assert fused.resolve_fused("auto", "cuda") == "liger"
    assert fused.resolve_fused("auto", "cpu") == "none"
    monkeypatch.setattr(fused.importlib.util, "find_spec",
                        lambda name: None if name == "liger_kernel" else real(name))
    assert fused.resolve_fused("auto", "cuda") == "none"
    # On this CPU machine auto leaves a model untouched.
    m = make_model()
    fuse_kernels(m, "auto")
    assert all(layer.mlp._compiled_call_impl is None for layer in m.model.layers)


def test_varlen_kernel_takes_half_precision_or_autocast():
    from polar_scaling.packed_attention import _flash_dtype

    q = torch.zeros(4, 2, 8, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in _flash_dtype(q, q, q))
    with pytest.raises(ValueError, match="fp16 or bf16"):
        _flash_dtype(q.float(), q.float(), q.float())


def test_liger_needs_cuda_and_says_so():
    m = make_model()
    with pytest.raises(RuntimeError, match="liger"):
        fuse_kernels(m, "liger")


def test_engine_args_validate_fused_kernels():
    from polar_scaling.config import ConfigError, from_dict
    from polar_scaling.engine import EngineArgs

    assert from_dict(EngineArgs, {"fused_kernels": "compile"}).fused_kernels == "compile"
    with pytest.raises(ConfigError, match="fused_kernels"):
        from_dict(EngineArgs, {"fused_kernels": "turbo"})


def test_benchmark_fused_accumulated_and_profiled_on_cpu(tmp_path):
    """gpu_mfu.py's CPU branch with compiled kernels, 2 micro-batches per step and a profile."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "mfu.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TORCH_EXTENSIONS_DIR=str(root / ".cache" / "torch_extensions"))
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_mfu.py"), "--steps", "1",
                           "--warmup", "0", "--grad-accum", "2", "--fused", "compile",
                           "--mode", "packed", "--profile", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    packed = json.loads(out.read_text())["packed"]
    assert packed["grad_accum"] == 2 and packed["fused_kernels"] == "compile"
    assert packed["reward_check"]["fused_vs_plain_fp32"] < 1e-5
    # two micro-batches' worth of real tokens in the one timed step
    assert packed["real_tokens"] > 0 and packed["timed_steps"] == 1
    top = packed["profile_top"]
    assert len(top) >= 10 and any("mm" in row["name"] for row in top)


def test_activation_checkpointing_recomputes_and_keeps_gradients(recwarn):
    """The engine's checkpointing switch gives the same rewards and gradients, through
    transformers' current method (no deprecation warning)."""
    from polar_scaling.engine import enable_activation_checkpointing

    plain = make_model().train()
    ckpt = copy.deepcopy(plain)
    enable_activation_checkpointing(ckpt.model)
    assert ckpt.model.is_activation_checkpointing and not plain.model.is_activation_checkpointing
    batch = packed_batch()
    want_r, want_g = rewards_and_grads(plain, batch, "sdpa")
    got_r, got_g = rewards_and_grads(ckpt, batch, "sdpa")
    torch.testing.assert_close(got_r, want_r, rtol=1e-6, atol=1e-6)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not [w for w in recwarn if "deprecated" in str(w.message)]
