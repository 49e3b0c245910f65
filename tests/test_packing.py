"""Packing, packed attention, MFU/peak helpers, the batch planner and the CPU benchmark."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from polar_scaling import gpu
from polar_scaling.batch_plan import GIB, plan_batch, row_tokens_for, state_bytes
from polar_scaling.losses import pair_scores
from polar_scaling.model import RewardModel
from polar_scaling.packed_attention import (
    best_packed_attention,
    needs_one_row,
    packed_inputs,
    segment_starts,
    use_attention,
)
from polar_scaling.packing import (
    PackedBatch,
    first_fit_decreasing,
    group_pairs,
    length_batches,
    pack_pairs,
    pack_sequences,
    pad_sequences,
    padded_pad_share,
)
from polar_scaling.sizes import get_size, hf_config, total_params

ROOT = Path(__file__).resolve().parents[1]
VOCAB, PAD, ROW = 97, 0, 32
# One sequence fills a row exactly; several short ones share a row; one is a lone token.
LENGTHS = [32, 5, 1, 3, 2, 4, 1, 2, 20, 11, 7, 30, 6]


def random_seqs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = RewardModel.from_config(hf_config(get_size("t25k").with_vocab(VOCAB), pad_token_id=PAD))
    # A head larger than the default init makes any leak between sequences visible.
    torch.nn.init.normal_(m.score.weight, std=1.0)
    return m.eval()


@pytest.fixture(scope="module")
def padded_rewards(model):
    ids, mask = pad_sequences(random_seqs(LENGTHS), PAD)
    use_attention(model, "sdpa")
    with torch.no_grad():
        return model(ids, attention_mask=mask)


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("impl", ["sdpa", "eager", "polar_varlen"])
def test_packed_rewards_equal_padded(model, padded_rewards, impl):
    batch = pack_sequences(random_seqs(LENGTHS), ROW, PAD)
    assert batch.input_ids.shape == (4, ROW)  # 124 tokens in 4 rows of 32: 3% padding
    # the row-filling sequence sits alone in a full row; some row holds many sequences
    rows = batch.score_index // ROW
    assert (rows == rows[0]).sum() == 1
    assert max(int((rows == r).sum()) for r in rows.unique()) >= 4
    use_attention(model, impl)
    with torch.no_grad():
        packed = model(**packed_inputs(batch, impl))
    use_attention(model, "sdpa")
    assert packed.shape == padded_rewards.shape
    assert torch.allclose(packed, padded_rewards, atol=1e-5, rtol=0)
    assert padded_rewards.std() > 0.1  # the comparison is not between near-zero numbers


def test_flattened_rows_give_the_same_rewards(model, padded_rewards):
    batch = pack_sequences(random_seqs(LENGTHS), ROW, PAD).flattened()
    assert batch.input_ids.shape[0] == 1
    for impl in ("sdpa", "polar_varlen"):
        use_attention(model, impl)
        with torch.no_grad():
            out = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                        score_index=batch.score_index)
        assert torch.allclose(out, padded_rewards, atol=1e-5, rtol=0), impl
    use_attention(model, "sdpa")


def test_compact_rows_drop_padding_and_give_the_same_rewards(model, padded_rewards):
    packed = pack_sequences(random_seqs(LENGTHS), ROW, PAD)
    batch = packed.compact()
    assert packed.pad_share > 0.02  # there was padding to drop (4 of 128 slots)
    assert batch.input_ids.shape == (1, sum(LENGTHS)) and batch.pad_share == 0.0
    # The reward tokens are the same tokens, in the same order.
    assert torch.equal(batch.input_ids.reshape(-1)[batch.score_index],
                       packed.input_ids.reshape(-1)[packed.score_index])
    for impl in ("sdpa", "polar_varlen"):
        use_attention(model, impl)
        with torch.no_grad():
            out = model(**packed_inputs(batch, impl))
        assert torch.allclose(out, padded_rewards, atol=1e-5, rtol=0), impl
    use_attention(model, "sdpa")


def test_positions_that_do_not_restart_leak_between_sequences(model, padded_rewards):
    batch = pack_sequences(random_seqs(LENGTHS), ROW, PAD)
    leaky = torch.arange(ROW).expand_as(batch.input_ids).contiguous()
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, position_ids=leaky,
                    score_index=batch.score_index)
    assert (out - padded_rewards).abs().max() > 1e-2


def test_pair_order_survives_packing(model):
    chosen = random_seqs([9, 3, 14, 1], seed=1)
    rejected = random_seqs([12, 30, 2, 5], seed=2)
    batch = pack_pairs(chosen, rejected, ROW, PAD)
    use_attention(model, "sdpa")
    with torch.no_grad():
        c, r = pair_scores(model(**packed_inputs(batch, "sdpa")))
        ids, mask = pad_sequences(chosen + rejected, PAD, side="left")
        pc, pr = pair_scores(model(ids, attention_mask=mask))
    assert torch.allclose(c, pc, atol=1e-5, rtol=0) and torch.allclose(r, pr, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- layout details


def test_score_index_points_at_each_last_token_in_input_order():
    seqs = random_seqs(LENGTHS, seed=3)
    batch = pack_sequences(seqs, ROW, PAD)
    flat_ids, flat_pos = batch.input_ids.reshape(-1), batch.position_ids.reshape(-1)
    assert flat_ids[batch.score_index].tolist() == [s[-1] for s in seqs]
    assert flat_pos[batch.score_index].tolist() == [n - 1 for n in LENGTHS]
    assert batch.seq_lens.tolist() == LENGTHS
    assert batch.real_tokens == sum(LENGTHS)
    assert batch.pad_share == pytest.approx(1 - sum(LENGTHS) / batch.input_ids.numel())
    # each sequence's tokens sit contiguously, ending at its score index
    for s, end in zip(seqs, batch.score_index.tolist(), strict=True):
        assert flat_ids[end - len(s) + 1:end + 1].tolist() == s


def test_first_fit_decreasing_is_valid_and_deterministic():
    lengths = [7, 3, 8, 2, 2, 5, 1, 8, 4]
    bins = first_fit_decreasing(lengths, 10)
    assert bins == first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    # 40 tokens in 4 full bins; the longest (index 2, ties by index) opens the first bin
    assert bins == [[2, 3], [4, 7], [0, 1], [5, 6, 8]]
    with pytest.raises(ValueError, match="more than a row"):
        first_fit_decreasing([3, 11], 10)
    with pytest.raises(ValueError, match="at least one token"):
        first_fit_decreasing([3, 0], 10)


def test_min_rows_and_pad_tail_positions():
    batch = pack_sequences([[5, 6, 7]], 8, PAD, min_rows=2)
    assert batch.input_ids.tolist() == [[5, 6, 7, 0, 0, 0, 0, 0], [0] * 8]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], list(range(8))]
    assert segment_starts(batch.position_ids).tolist() == [0, 3, 8, 16]


def test_segment_starts_follow_position_resets():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]])
    assert segment_starts(pos).tolist() == [0, 3, 5, 6, 7, 12]


def test_group_pairs_keeps_data_order_and_capacity():
    pairs = [(10, 12), (3, 4), (20, 20), (5, 5), (30, 31), (2, 2)]
    groups = group_pairs(pairs, row_tokens=32, rows=1)
    assert [i for g in groups for i in g] == list(range(len(pairs)))
    # (20, 20) and (30, 31) each need two rows, so each gets a micro-batch of its own
    assert groups == [[0, 1], [2], [3], [4], [5]]
    for g in groups:
        lens = [pairs[i][0] for i in g] + [pairs[i][1] for i in g]
        assert len(first_fit_decreasing(lens, 32)) <= (1 if len(g) > 1 or g == [3] else 2)
    # two rows: 69 tokens of the first three pairs exceed 64, the next (5, 5) fits after (20, 20)
    assert group_pairs(pairs, 32, rows=2) == [[0, 1], [2, 3], [4], [5]]
    with pytest.raises(ValueError):
        group_pairs([(3, 40)], 32, 1)


# ---------------------------------------------------------------------------- pad shares


def test_pad_share_by_hand():
    lengths = [1, 9, 2, 8]
    plain = length_batches(lengths, 2, bucket=False)
    bucketed = length_batches(lengths, 2, bucket=True)
    assert plain == [[0, 1], [2, 3]] and bucketed == [[0, 2], [3, 1]]
    assert padded_pad_share(lengths, plain) == pytest.approx(1 - 20 / 34)
    assert padded_pad_share(lengths, bucketed) == pytest.approx(1 - 20 / 22)
    assert pack_sequences(random_seqs(lengths), 10, PAD).pad_share == pytest.approx(0.0)


def test_pad_share_on_polar_like_lengths():
    rng = np.random.default_rng(0)
    n = 512
    prompt = np.clip(rng.lognormal(np.log(128), 1.0, n), 1, 1024).astype(int)
    ref, cand = (np.clip(rng.lognormal(np.log(512), 1.0, n), 1, 4096).astype(int) for _ in "ab")
    lengths = (2 * prompt + ref + cand + 2).tolist()
    plain = padded_pad_share(lengths, length_batches(lengths, 8, bucket=False))
    bucketed = padded_pad_share(lengths, length_batches(lengths, 8, bucket=True))
    bins = first_fit_decreasing(lengths, 16384)
    packed = 1 - sum(lengths) / (len(bins) * 16384)
    assert plain > 0.4 and bucketed < 0.1 and packed < 0.03
    assert packed < bucketed < plain


# ------------------------------------------------------------------------- GPU helpers


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
    ("NVIDIA A10G", 70e12), ("NVIDIA A10", 125e12), ("cpu", None), ("Tesla T4", None),
])
def test_peak_table(name, peak):
    assert gpu.peak_flops(name, environ={}) == peak


def test_peak_overrides_and_mfu():
    assert gpu.peak_flops("cpu", environ={gpu.PEAK_ENV: "1e12"}) == 1e12
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3", override=500e12, environ={}) == 500e12
    assert gpu.mfu(494.5e12, 989e12) == pytest.approx(0.5)
    assert gpu.mfu(1e12, None) is None
    assert gpu.mfu(1e12, 0.0) is None


def test_cpu_device_helpers():
    assert gpu.device_name("cpu") == "cpu"
    assert gpu.peak_flops(gpu.device_name("cpu"), environ={}) is None
    assert gpu.memory_stats("cpu")["rss_peak_gib"] > 0.05
    assert gpu.total_memory_bytes("cpu") is None
    assert best_packed_attention("cpu") == "sdpa"
    if importlib.util.find_spec("flash_attn") is None:  # torch 2.13 has the varlen kernel
        assert best_packed_attention("cuda") == "polar_varlen"
    assert needs_one_row("flash_attention_2") and not needs_one_row("flex_attention")


# -------------------------------------------------------------------------- batch plan


def test_state_bytes_shard_with_zero_stage():
    s = get_size("1.8B")
    n = total_params(s)
    assert state_bytes(s, 0, 8) == pytest.approx(16 * n)
    assert state_bytes(s, 1, 8) == pytest.approx((2 + 2 + 12 / 8) * n)
    assert state_bytes(s, 2, 8) == pytest.approx((2 + 14 / 8) * n)
    assert state_bytes(s, 3, 8) == pytest.approx(16 / 8 * n)


def test_plan_estimates_match_the_measured_h100_peaks():
    """The constants reproduce the peaks measured on one H100 (docs/gpu_runs/...-h100-b)."""
    runs = ROOT / "docs" / "gpu_runs" / "2026-11-26-h100-b"
    size = get_size("1.8B")
    card = 79.18 * GIB  # what torch reports for an H100 80GB HBM3
    for name, fused in [("mfu_none_nockpt_ga4_profile", False), ("mfu_liger_nockpt_ga4", True)]:
        r = json.loads((runs / f"{name}.json").read_text())
        measured = r["packed"]["mem_peak_gib"]
        assert not r["packed"]["activation_checkpointing"] and r["packed"]["row_tokens"] == 16384
        plan = plan_batch(size, card, world=1, step_tokens=16384, fused=fused)
        assert (plan.rows, plan.activation_checkpointing) == (1, False)
        assert abs(plan.est_peak_gib - measured) < 2.0, (name, plan.est_peak_gib, measured)


def test_compact_plan_is_the_widest_micro_batch_measured_to_fit():
    """With a varlen kernel (one row of any width) the 1.8B plan on an H100 is the 24,576-token
    micro-batch that ran at 70.6 GiB (docs/gpu_runs/2026-11-26-h100-c), not 16,384."""
    size, card = get_size("1.8B"), 79.18 * GIB
    runs = ROOT / "docs" / "gpu_runs" / "2026-11-26-h100-c"
    plan = plan_batch(size, card, world=1, step_tokens=1 << 20, fused=True, compact=True)
    assert (plan.row_tokens, plan.rows, plan.zero_stage, plan.activation_checkpointing) == \
        (24576, 1, 0, False)
    assert plan.step_tokens(1) >= 1 << 20 > plan.step_tokens(1) - plan.micro_tokens
    for name, tokens in [("r24k/mfu_liger_nockpt_ga4_tight_r24k", 24576),
                         ("mfu_liger_nockpt_ga4_tight", 16384)]:
        r = json.loads((runs / f"{name}.json").read_text())["packed"]
        assert r["pad_share"] == 0 and not r["activation_checkpointing"]
        est = plan_batch(size, card, 1, tokens, fused=True, compact=True)
        assert est.row_tokens == tokens
        assert abs(est.est_peak_gib - r["mem_peak_gib"]) < 1.0, (name, est, r["mem_peak_gib"])
    # the next 1,024 tokens would pass the 90% headroom
    assert plan.est_peak_gib <= 0.9 * 79.18 < plan.est_peak_gib + 1024 * 24 * 75776 / GIB
    # never narrower than the longest sequence; never wider than the step needs per GPU
    shortest = plan_batch(size, card, 1, 1000, fused=True, compact=True)
    assert shortest.row_tokens == 11 * 1024  # POLAR's longest sequence, 10,242 tokens
    with pytest.raises(ValueError, match="does not fit"):
        plan_batch(get_size("7B"), 40 * GIB, 1, 1 << 20, fused=True, compact=True)


def test_plans_along_the_ladder():
    h100 = 80 * GIB
    # Measured: a 16,384-token row of the 1.8B shape trains without checkpointing on 80 GB.
    p18 = plan_batch(get_size("1.8B"), h100, world=1, step_tokens=1 << 20)
    assert (p18.row_tokens, p18.zero_stage, p18.activation_checkpointing) == (16384, 0, False)
    assert p18.step_tokens(1) >= 1 << 20 and p18.est_peak_gib <= 0.9 * 80
    # Fused kernels leave room for more rows of a smaller model.
    p500 = plan_batch(get_size("500M"), h100, world=1, step_tokens=1 << 20)
    p500f = plan_batch(get_size("500M"), h100, world=1, step_tokens=1 << 20, fused=True)
    assert not p500.activation_checkpointing and p500.zero_stage == 0
    assert p500f.rows > p500.rows
    p7 = plan_batch(get_size("7B"), h100, world=8, step_tokens=1 << 21)
    assert p7.activation_checkpointing and p7.zero_stage >= 1
    assert p7.step_tokens(8) >= 1 << 21 and p7.est_peak_gib <= 0.9 * 80
    p7_small = plan_batch(get_size("7B"), 40 * GIB, world=8, step_tokens=1 << 21)
    assert p7_small.zero_stage > p7.zero_stage and p7_small.activation_checkpointing
    assert plan_batch(get_size("7B"), h100, 8, 1 << 21, min_zero_stage=3).zero_stage == 3
    with pytest.raises(ValueError, match="does not fit"):
        plan_batch(get_size("7B"), h100, world=1, step_tokens=1 << 20)
    # a small step: one micro-batch of one row, no accumulation
    tiny = plan_batch(get_size("50M"), h100, world=4, step_tokens=1000)
    assert (tiny.rows, tiny.grad_accum) == (1, 1)
    assert row_tokens_for(10_242) == 16384 and row_tokens_for(100) == 1024


# ----------------------------------------------------------------- benchmark, CPU branch


def test_benchmark_runs_tiny_shape_on_cpu(tmp_path):
    out = tmp_path / "mfu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_mfu.py"),
                           "--steps", "1", "--warmup", "1", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny shape" in proc.stdout
    r = json.loads(out.read_text())
    assert r["cpu_tiny_shape"] and r["peak_flops"] is None
    for loop in ("packed", "padded"):
        assert r[loop]["mfu"] is None and r[loop]["real_tokens_per_s"] > 0
        assert r[loop]["timed_steps"] == 1
    assert r["packed"]["reward_check"]["max_abs_diff"] < 1e-4
    assert r["ratio_real_tokens_per_s"] > 0


def test_packed_batch_moves_between_devices():
    batch = pack_sequences([[1, 2], [3]], 4, PAD)
    moved = batch.to("cpu")
    assert isinstance(moved, PackedBatch)
    assert torch.equal(moved.input_ids, batch.input_ids)


def test_throughput_rows_exclude_pauses(tmp_path):
    now = [100.0]
    perf = gpu.Throughput(world=2, tokens=0, flops=0.0, peak=1e12, clock=lambda: now[0])
    now[0] = 110.0
    perf.pause(2.0)  # 8 s of training on 2 GPUs
    row = perf.log(tmp_path / "perf.jsonl", 5, tokens=1600, flops=8e12)
    assert row["step"] == 5 and row["tokens_per_s_per_gpu"] == pytest.approx(100)
    assert row["model_tflops_per_s_per_gpu"] == pytest.approx(0.5)
    assert row["mfu"] == pytest.approx(0.5)
    now[0] = 114.0
    row = perf.log(tmp_path / "perf.jsonl", 6, tokens=2000, flops=1.2e13)
    assert row["tokens_per_s_per_gpu"] == pytest.approx(50)
    perf.log(tmp_path / "perf.jsonl", 7, tokens=2000, flops=1.2e13, enabled=False)
    assert [json.loads(x)["step"] for x in (tmp_path / "perf.jsonl").read_text().splitlines()] \
        == [5, 6]
    assert perf.summary(2000, 1.2e13)["tokens_per_s_per_gpu"] == pytest.approx(2000 / 12 / 2)


def test_throughput_on_cpu_reports_no_mfu(monkeypatch):
    monkeypatch.delenv(gpu.PEAK_ENV, raising=False)
    monkeypatch.setattr(gpu, "device_name", lambda device=None: "cpu")
    perf = gpu.Throughput(world=1, tokens=0, flops=0.0)
    assert perf.peak is None and perf.summary(10, 1e9)["mfu"] is None


def test_plan_command_prints_the_plan_and_names_bad_input(capsys):
    from polar_scaling.batch_plan import main

    plan = main(["--size", "1.8B", "--fused", "--compact", "--step-tokens", "1e6"])
    out = capsys.readouterr().out
    assert plan.row_tokens == 24576 and "24,576 tokens per micro-batch" in out
    assert f"{plan.grad_accum} micro-batches per step" in out and "ZeRO-0" in out
    with pytest.raises(SystemExit, match="does not fit 1 GPU"):
        main(["--size", "7B"])
    with pytest.raises(SystemExit, match="unknown model size '9Q'"):
        main(["--size", "9Q"])


def test_fit_micro_takes_the_most_pairs_whose_worst_micro_batch_fits():
    from polar_scaling.batch_plan import fit_micro

    pairs = [10, 40, 30, 20, 50, 60, 5, 25]  # tokens of each pair, both sequences
    # compact rows: the sum of the m longest pairs (60+50+40+30 = 180) must fit
    assert fit_micro(pairs, 35, per_rank=8, budget_tokens=180, compact=True) == 4
    assert fit_micro(pairs, 35, per_rank=8, budget_tokens=179, compact=True) == 2
    assert fit_micro(pairs, 35, per_rank=8, budget_tokens=10 ** 6, compact=True) == 8
    assert fit_micro(pairs, 35, per_rank=6, budget_tokens=180, compact=True) == 3  # divisors
    # padded or packed with tails: 2 * m * longest slots
    assert fit_micro(pairs, 35, per_rank=8, budget_tokens=2 * 2 * 35, compact=False) == 2
    assert fit_micro(pairs, 35, per_rank=8, budget_tokens=69, compact=False) == 0


def test_choose_micro_plans_on_a_gpu_only_when_batch_micro_is_unset(recwarn):
    from types import SimpleNamespace

    from polar_scaling.batch_plan import activation_budget_tokens
    from polar_scaling.engine import EngineArgs
    from polar_scaling.pairs import PairData
    from polar_scaling.stage_args import PairBatchArgs, choose_micro

    size = get_size("1.8B")
    long_pairs = PairData([[1] * 3500] * 64, [[1] * 2500] * 64)  # 6,000 tokens a pair
    compact = SimpleNamespace(compact=True)
    engine = EngineArgs(fused_kernels="none")
    card = 79.18 * GIB
    budget = activation_budget_tokens(size, card, 1, 0, False)
    assert budget == int((0.9 * card - 3 * GIB - state_bytes(size, 0, 1)) // (24 * 106496))  # 26d + 4d_kv + 6f
    micro, rec = choose_micro(PairBatchArgs(size=64), engine, size, long_pairs, 1, compact, card)
    assert micro == 2 and 2 * 6000 <= budget < 4 * 6000  # 2 pairs fit, 4 do not
    assert rec["micro_from"] == "batch planner" and rec["micro_token_budget"] == budget
    # a larger world shards the states (ZeRO-1) and leaves more room; a rank has fewer pairs
    wide, _ = choose_micro(PairBatchArgs(size=64), EngineArgs(zero_stage=1, fused_kernels="none"),
                           size, long_pairs, 8, compact, card)
    assert wide == 4  # 8 pairs a rank; 4 x 6,000 tokens fit beside a ZeRO-1 shard
    # explicit batch.micro wins; no GPU keeps the whole rank's share
    assert choose_micro(PairBatchArgs(size=64, micro=16), engine, size, long_pairs, 1, compact,
                        card)[0] == 16
    assert choose_micro(PairBatchArgs(size=64), engine, size, long_pairs, 2, compact, 0)[0] == 32
    # not even one pair fits a small card: one pair per micro-batch, and a warning
    assert not recwarn.list
    tight, _ = choose_micro(PairBatchArgs(size=64), engine, size, long_pairs, 1, compact, 30 * GIB)
    assert tight == 1 and "activation_checkpointing" in str(recwarn.pop(UserWarning).message)
