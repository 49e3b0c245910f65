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
