import importlib.util

import numpy as np
import pytest

from polar_scaling.errors import StageError
from polar_scaling.pairs import PairData, PairStepSource


def make_pairs(n=256, seed=0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(5, 200, size=n)
    chosen = [np.full(k, 7 + i % 2) for i, k in enumerate(lens)]
    rejected = [np.full(k + 1, 9) for k in lens]
    return PairData(chosen, rejected)


def source(data, **kw):
    args = dict(batch_size=16, micro=4, world=1, pad_id=0, flops_fn=lambda lens: 10.0 * sum(lens),
                budget_tokens=20_000, seed=3)
    args.update(kw)
    return PairStepSource(data, **args)


def test_budget_sets_the_smallest_number_of_steps_that_reaches_it():
    src = source(make_pairs())
    tokens = np.cumsum([src.step_tokens(s) for s in range(len(make_pairs()) // 16)])
    assert tokens[src.num_steps - 1] >= 20_000 > tokens[src.num_steps - 2]
    flops = source(make_pairs(), budget_tokens=None, budget_flops=1e5)
    assert sum(flops.step_flops(s) for s in range(flops.num_steps)) >= 1e5


def test_bucketing_cuts_padding():
    data = make_pairs()
    plain = source(data, bucket_steps=1).pad_share(8)
    bucketed = source(data, bucket_steps=16).pad_share(8)
    assert plain > 0.3 and bucketed < 0.1


def test_every_pair_used_once_and_order_is_deterministic():
    data = make_pairs()
    a, b = source(data), source(data)
    assert np.array_equal(a.order, b.order)
    assert sorted(a.order.tolist()) == list(range(256))
    assert not np.array_equal(a.order, source(data, seed=4).order)


def test_ranks_split_a_step_and_micro_batches_pair_up():
    data = make_pairs()
    src = source(data, world=2, micro=4)
    assert src.grad_accum == 2
    r0, r1 = src.micro_batches(5, 0, 2), src.micro_batches(5, 1, 2)
    assert len(r0) == len(r1) == 2
    ids = r0[0]["input_ids"]
    assert ids.shape[0] == 8  # 4 chosen then 4 rejected
    assert (ids[4:, 0] == 9).all() and (ids[:4, 0] != 9).all()


def test_swap_exchanges_sides():
    data = make_pairs()
    swap = np.ones(len(data), dtype=bool)
    ids = source(data, swap=swap).micro_batches(0, 0, 1)[0]["input_ids"]
    assert (ids[:4, 0] == 9).all()


def test_budgets_beyond_the_data_or_below_a_step_are_errors():
    with pytest.raises(StageError, match="needs more data than the dataset holds"):
        source(make_pairs(), budget_tokens=1e9)
    with pytest.raises(StageError, match="smaller than one optimizer step"):
        source(make_pairs(), budget_tokens=1)
    with pytest.raises(StageError, match="not a multiple"):
        source(make_pairs(), batch_size=10)


# ------------------------------------------------------------------------------- packing


def unpack(batch):
    """The sequences of a PackedBatch, in its score order."""
    flat = batch.input_ids.reshape(-1)
    return [flat[int(e) - int(n) + 1:int(e) + 1].tolist()
            for e, n in zip(batch.score_index, batch.seq_lens, strict=True)]


def unpad(batch):
    return [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"],
                                                           batch["attention_mask"], strict=True)]


@pytest.mark.parametrize("swap", [False, True])
def test_packed_micro_batches_hold_the_padded_sequences(swap):
    data = make_pairs()
    flips = np.random.default_rng(1).random(len(data)) < 0.5 if swap else None
    padded = source(data, world=2, swap=flips)
    packed = source(data, world=2, swap=flips, row_tokens=512)
    assert packed.num_steps == padded.num_steps and packed.grad_accum == padded.grad_accum
    for step in range(padded.num_steps):
        assert packed.step_tokens(step) == padded.step_tokens(step)
        assert packed.step_flops(step) == padded.step_flops(step)
        for rank in (0, 1):
            a, b = padded.micro_batches(step, rank, 2), packed.micro_batches(step, rank, 2)
            assert len(a) == len(b) == 2
            for pad_mb, pack_mb in zip(a, b, strict=True):
                assert unpack(pack_mb) == unpad(pad_mb)
                assert pack_mb.input_ids.shape[1] <= 512
                assert pack_mb.slots <= pad_mb["attention_mask"].numel()


def test_packing_pads_less_than_bucketing_on_mixed_lengths():
    data = make_pairs()  # 5 to 200 tokens
    for micro in (4, 16):
        plain = source(data, micro=micro, bucket_steps=1).pad_share(8)
        bucketed = source(data, micro=micro, bucket_steps=16).pad_share(8)
        packed = source(data, micro=micro, bucket_steps=1, row_tokens=256).pad_share(8)
        packed_bucketed = source(data, micro=micro, bucket_steps=16, row_tokens=256).pad_share(8)
        assert packed < 0.5 * plain and packed_bucketed < bucketed, micro
        assert packed_bucketed < 0.05 and packed < 0.12, micro


def test_compact_packed_steps_hold_the_same_sequences_without_padding():
    data = make_pairs()
    packed = source(data, micro=8, bucket_steps=1, row_tokens=256)
    compact = source(data, micro=8, bucket_steps=1, row_tokens=256, compact=True)
    assert packed.pad_share(4) > 0.01 and compact.pad_share(4) == 0.0
    for step in range(4):
        for a, b in zip(packed.micro_batches(step, 0, 1), compact.micro_batches(step, 0, 1),
                        strict=True):
            assert unpack(a) == unpack(b) and b.input_ids.shape[0] == 1


def test_fit_row_width_never_needs_more_slots_than_padding():
    from polar_scaling.packing import first_fit_decreasing, fit_row_width

    rng = np.random.default_rng(0)
    for _ in range(200):
        lens = rng.integers(1, 60, size=rng.integers(1, 20)).tolist()
        width = fit_row_width(lens, 64)
        rows = len(first_fit_decreasing(lens, width))
        assert max(lens) <= width <= 64
        assert rows * width <= len(lens) * max(lens)
        assert rows * width <= len(first_fit_decreasing(lens, 64)) * 64
    assert fit_row_width([3, 3, 3, 2], 64) == 11  # one row, cut to its contents
    assert fit_row_width([3, 3, 3, 3], 64) == 3  # a tie: the narrower rows
    assert fit_row_width([50, 49, 48], 64) == 50  # one sequence a row, cut to the longest


def test_row_tokens_default_and_too_short_rows():
    from polar_scaling.pairs import resolve_row_tokens

    data = make_pairs()  # longest: a rejected sequence of 200 tokens
    assert resolve_row_tokens(0, {"training": data}) == 256
    assert resolve_row_tokens(300, {"training": data}) == 300
    longest = max(range(len(data)), key=lambda i: len(data.rejected[i]))
    with pytest.raises(StageError, match=rf"batch.row_tokens=128 is shorter than rejected "
                                         rf"sequence {longest} of the training pairs \(200 "
                                         rf"tokens; \d+ sequences do not fit\).*\(256 here\)"):
        resolve_row_tokens(128, {"training": data})
    short = PairData([np.ones(4)], [np.ones(3)])
    with pytest.raises(StageError, match="chosen sequence 0 of the eval pairs"):
        resolve_row_tokens(3, {"training": PairData([np.ones(2)], [np.ones(2)]), "eval": short})


def test_layout_resolution():
    from polar_scaling.config import ConfigError, load_config
    from polar_scaling.stage_args import ModelArgs, PairBatchArgs, resolve_layout

    def batch(*o):
        return load_config(PairBatchArgs, None, list(o))

    assert resolve_layout(batch(), "auto", "cpu") == (False, "sdpa")
    assert resolve_layout(batch("packing=on"), "auto", "cpu") == (True, "sdpa")
    assert resolve_layout(batch("packing=off"), "auto", "cuda") == (False, "sdpa")
    packed, impl = resolve_layout(batch(), "auto", "cuda")
    assert packed and impl in ("flash_attention_2", "polar_varlen")
    assert resolve_layout(batch("packing=on"), "polar_varlen", "cpu") == (True, "polar_varlen")
    from polar_scaling.stage_args import BatchLayout

    assert BatchLayout(True, "polar_varlen", 64).compact
    assert BatchLayout(True, "flash_attention_2", 64).compact
    assert not BatchLayout(True, "sdpa", 64).compact and not BatchLayout(False, "sdpa", None).compact
    with pytest.raises(StageError, match="model.attention=polar_varlen reads packed rows only"):
        resolve_layout(batch(), "polar_varlen", "cpu")
    with pytest.raises(StageError, match="flex_attention has no backward pass on CPU"):
        resolve_layout(batch("packing=on"), "flex_attention", "cpu")
    assert resolve_layout(batch("packing=on"), "flex_attention", "cuda") == (True, "flex_attention")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(StageError, match="needs the flash-attn package"):
            resolve_layout(batch("packing=on"), "flash_attention_2", "cuda")
    from polar_scaling.pretrain import PretrainArgs

    with pytest.raises(ConfigError, match="batch.packing: expected one of"):
        load_config(PretrainArgs, None, ["batch.packing=sometimes"])
    with pytest.raises(ConfigError, match="model.attention: expected one of"):
        load_config(PretrainArgs, None, ["model.attention=flash_attention_9"])
    assert load_config(ModelArgs, None, ["attention=eager"]).attention == "eager"
    with pytest.raises(ConfigError, match="row_tokens: expected a value >= 0"):
        batch("row_tokens=-1")


@pytest.mark.parametrize("attention", ["sdpa", "polar_varlen"])
def test_packed_evaluation_equals_padded(attention, one_thread):
    import torch

    from polar_scaling.model import RewardModel
    from polar_scaling.packed_attention import use_attention
    from polar_scaling.pairs import evaluate_pairs
    from polar_scaling.sizes import get_size, hf_config

    torch.manual_seed(0)
    model = RewardModel.from_config(hf_config(get_size("t12k").with_vocab(32), pad_token_id=0))
    torch.nn.init.normal_(model.score.weight, std=1.0)  # spread scores: a leak would show
    rng = np.random.default_rng(0)
    data = PairData([rng.integers(1, 32, rng.integers(2, 40)) for _ in range(20)],
                    [rng.integers(1, 32, rng.integers(2, 40)) for _ in range(20)])
    bins = np.arange(20) % 3
    padded = evaluate_pairs(model, data, 0, batch=8, bins=bins)
    use_attention(model, attention)
    packed = evaluate_pairs(model, data, 0, batch=8, bins=bins, row_tokens=64,
                            attention=attention)
    use_attention(model, "sdpa")
    assert 0.2 < padded["accuracy"] < 0.8 and padded.keys() == packed.keys()
    for k in padded:
        assert packed[k] == pytest.approx(padded[k], abs=1e-5), k


def test_padded_auto_layout_keeps_the_models_kernel():
    from polar_scaling.config import load_config
    from polar_scaling.model import RewardModel
    from polar_scaling.packed_attention import use_attention
    from polar_scaling.sizes import get_size, hf_config
    from polar_scaling.stage_args import BatchLayout, PairBatchArgs

    model = RewardModel.from_config(hf_config(get_size("t12k").with_vocab(32), pad_token_id=0))
    use_attention(model, "eager")
    sets = {"training": make_pairs(8)}
    layout = BatchLayout.resolve(PairBatchArgs(), "auto", sets, device_type="cpu")
    layout.apply(model)
    assert model.config._attn_implementation == "eager" and layout.summary() == {
        "packing": False, "attention": "eager", "row_tokens": None, "compact_rows": False}
    packed = load_config(PairBatchArgs, None, ["packing=on"])
    layout = BatchLayout.resolve(packed, "auto", sets, device_type="cpu")
    layout.apply(model)
    assert model.config._attn_implementation == "sdpa" and layout.row_tokens == 256
