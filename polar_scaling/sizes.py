"""The model ladder: named sizes, exact parameter counts and training FLOPs.

Counts are closed-form for the Llama layout that transformers builds (RMSNorm, grouped-query
attention without biases, SwiGLU MLP, untied embeddings) and are checked against
``sum(p.numel())`` in the tests.

FLOPs convention (documented because the POLAR paper gives none): a training token costs
``6·N`` for the weight matmuls (forward 2N, backward 4N) plus ``12·L·d·T`` for attention
scores and values in a sequence of length T (forward 4·L·d·T, times 3). N counts the
non-embedding parameters, plus the output projection of a language model (a matmul, unlike
the embedding lookup); the reward head's d weights are included in N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ModelSize:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int | None = None  # None: taken from the tokenizer of the data
    rope_theta: float = 10_000.0
    max_seq_len: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def with_vocab(self, vocab: int) -> ModelSize:
        return ModelSize(**{**self.__dict__, "vocab": vocab})


def _cpu(name, hidden, layers, heads, ffn, kv_heads=None):
    return ModelSize(name, hidden, layers, heads, kv_heads or heads, ffn, rope_theta=10_000.0,
                     max_seq_len=1024)


def _cluster(name, hidden, layers, heads, kv_heads, ffn):
    return ModelSize(name, hidden, layers, heads, kv_heads, ffn, vocab=92544,
                     rope_theta=1_000_000.0, max_seq_len=32768)


# CPU ladder for the synthetic world: about 10K to 5M non-embedding parameters, spaced about
# 2x apart so a handful of rungs span a decade. Head dim 16 (small rungs) or 32.
CPU_LADDER = [
    _cpu("t12k", 32, 1, 2, 96),
    _cpu("t25k", 32, 2, 2, 96),
    _cpu("t50k", 48, 2, 3, 128),
    _cpu("t100k", 64, 2, 4, 192),
    _cpu("t200k", 64, 4, 4, 192),
    _cpu("t400k", 96, 4, 6, 256),
    _cpu("t800k", 128, 4, 4, 352),
    _cpu("t1.6m", 160, 5, 5, 448),
    _cpu("t3.2m", 224, 5, 7, 640),
    _cpu("t5m", 256, 6, 8, 704),
]

# Cluster ladder: InternLM2.5 shapes at 1.8B and 7B (DESIGN.md §1) and rungs between
# 50M and 1B non-embedding parameters for sweeps (vocab 92544, RoPE base 1e6).
CLUSTER_LADDER = [
    _cluster("50M", 640, 10, 10, 10, 1728),
    _cluster("100M", 768, 14, 12, 12, 2048),
    _cluster("250M", 1024, 20, 16, 8, 2816),
    _cluster("500M", 1536, 20, 12, 8, 4096),
    _cluster("1B", 2048, 20, 16, 8, 5632),
    _cluster("1.8B", 2048, 24, 16, 8, 8192),
    _cluster("7B", 4096, 32, 32, 8, 14336),
]

SIZES: dict[str, ModelSize] = {s.name: s for s in CPU_LADDER + CLUSTER_LADDER}


def get_size(name: str) -> ModelSize:
    """The ladder size called ``name``; an unknown name is a KeyError listing the known ones."""
    try:
        return SIZES[name]
    except KeyError:
        raise KeyError(f"unknown model size {name!r} (known: {', '.join(SIZES)})") from None


def layer_params(s: ModelSize) -> int:
    kv_dim = s.kv_heads * s.head_dim
    attn = 2 * s.hidden * s.hidden + 2 * s.hidden * kv_dim  # q, o and k, v projections
    mlp = 3 * s.hidden * s.ffn  # gate, up, down
    return attn + mlp + 2 * s.hidden  # two RMSNorm weights


def non_embedding_params(s: ModelSize, head: str = "reward") -> int:
    """Weights that take part in matmuls: layers, final norm, and the head.

    ``head="reward"``: a d→1 score head; ``"lm"``: a d→vocab output layer; ``"none"``: bare.
    """
    n = s.layers * layer_params(s) + s.hidden
    if head == "reward":
        n += s.hidden
    elif head == "lm":
        n += s.hidden * _vocab(s)
    elif head != "none":
        raise ValueError(f"head must be reward, lm or none, got {head!r}")
    return n


def total_params(s: ModelSize, head: str = "reward") -> int:
    return non_embedding_params(s, head) + _vocab(s) * s.hidden


def flops_per_token(s: ModelSize, seq_len: float, head: str = "reward") -> float:
    """Training FLOPs of one token in a sequence of ``seq_len`` tokens (6N + 12·L·d·T)."""
    return 6.0 * non_embedding_params(s, head) + 12.0 * s.layers * s.hidden * seq_len


def train_flops(s: ModelSize, seq_lens, head: str = "reward") -> float:
    """Training FLOPs of a batch of sequences: Σ_i T_i·(6N + 12·L·d·T_i)."""
    lens = np.asarray(seq_lens, dtype=np.float64)
    return float(6.0 * non_embedding_params(s, head) * lens.sum()
                 + 12.0 * s.layers * s.hidden * np.square(lens).sum())


def hf_config(s: ModelSize, vocab: int | None = None, pad_token_id: int | None = None, **extra):
    """A transformers ``LlamaConfig`` for this size (no hub access)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab or _vocab(s), hidden_size=s.hidden, intermediate_size=s.ffn,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim, max_position_embeddings=s.max_seq_len, rope_theta=s.rope_theta,
        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        pad_token_id=pad_token_id, **extra,
    )


def _vocab(s: ModelSize) -> int:
    if s.vocab is None:
        raise ValueError(f"size {s.name} has no vocabulary yet: call with_vocab(n) first")
    return s.vocab
