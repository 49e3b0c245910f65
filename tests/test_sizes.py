import pytest
import torch
from transformers import AutoModel

from polar_scaling.model import RewardModel
from polar_scaling.sizes import (
    CLUSTER_LADDER,
    CPU_LADDER,
    flops_per_token,
    get_size,
    hf_config,
    non_embedding_params,
    total_params,
    train_flops,
)


@pytest.mark.parametrize("size", CPU_LADDER + CLUSTER_LADDER, ids=lambda s: s.name)
def test_counts_match_built_model(size):
    size = size if size.vocab else size.with_vocab(300)
    with torch.device("meta"):
        rm = RewardModel(AutoModel.from_config(hf_config(size)))
    total = sum(p.numel() for p in rm.parameters())
    emb = rm.model.embed_tokens.weight.numel()
    assert total == total_params(size)
    assert total - emb == non_embedding_params(size)


def test_lm_head_counted_for_language_models():
    s = get_size("t100k").with_vocab(300)
    assert non_embedding_params(s, "lm") - non_embedding_params(s, "none") == 300 * s.hidden


def test_cpu_ladder_spans_10k_to_5m_and_grows():
    counts = [non_embedding_params(s.with_vocab(300)) for s in CPU_LADDER]
    assert counts == sorted(counts)
    assert 10_000 <= counts[0] <= 20_000 and 3_000_000 <= counts[-1] <= 5_500_000


def test_internlm_shapes():
    s = get_size("1.8B")
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.ffn, s.vocab) == (2048, 24, 16, 8, 8192, 92544)
    assert s.rope_theta == 1e6
    s = get_size("7B")
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.ffn) == (4096, 32, 32, 8, 14336)
    assert 6.5e9 < total_params(s) < 7.5e9


def test_flops_formula():
    s = get_size("t100k").with_vocab(300)
    n = non_embedding_params(s)
    assert flops_per_token(s, 100) == 6 * n + 12 * s.layers * s.hidden * 100
    # a batch: per-sequence attention cost grows with the square of its length
    assert train_flops(s, [10, 30]) == pytest.approx(10 * flops_per_token(s, 10) + 30 * flops_per_token(s, 30))


def test_unknown_size_names_known_ones():
    with pytest.raises(KeyError, match="t100k"):
        get_size("t9000")
