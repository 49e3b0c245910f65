"""The synthetic policy world: a pool of tiny Llama policies in families, and its corpus.

Weights are drawn, never trained. Every tensor of a fresh draw is Gaussian: embeddings N(0, 1),
hidden linears N(0, 1/fan_in) (so attention and MLP move the residual stream as much as the
embedding does, and the next token depends on context, not only on the last token), norms 1,
and the output head N(0, s²/hidden) so that logits have standard deviation ``logit_scale`` s
(hidden states leave the final RMSNorm with unit RMS). s ≈ 1 gives about 5 nats/token.

Structure (``within_sigma`` and ``across_sigma`` are the distance knobs):
- family base: an independent draw per family (``across_sigma: null``), or the shared root
  draw plus ``across_sigma`` relative noise (smaller = families closer together);
- member 0 of a family is its base; member m ≥ 1 is the base plus ``within_sigma`` noise;
- ``bridges: k`` adds, for each pair of families a < b, k policies between their bases at
  t = 1/(k+1) … k/(k+1): each tensor ``(1−t)·base_a + t·base_b`` rescaled to the spread
  ``(1−t)·std_a + t·std_b`` (so the logit scale, hence the entropy, stays comparable). Ids
  ``b{a}-{b}t{i}``; each bridge is its own family of one (so pair drawing treats it as a
  distinct policy, and a reward model learns graded closeness, not only "same family or
  not"); held out when either end family is held out. ``bridges: 0`` leaves the pool as
  it was.
Noise is relative to each tensor's spread: ``w' = (w + σ·std(w)·ε) / sqrt(1 + σ²)``, which keeps
the spread (hence the entropy) unchanged; norm weights are not perturbed. Each draw uses its
own ``torch.Generator`` seeded from (world seed, role, family, member), so a policy is
reproducible alone. Held out: the last ``heldout_members_per_family`` members of each family
and the last ``heldout_families`` families entirely.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from polar_scaling.config import check
from polar_scaling.policies import SamplingConfig, SyntheticPolicy
from polar_scaling.tokenizer import FIRST_CONTENT_ID, MAX_CONTENT_VOCAB

CORPUS_ID = "corpus"


@dataclass
class PolicyArch:
    """Shape of every synthetic policy (a LlamaForCausalLM)."""

    hidden_size: int = field(default=64, metadata={"gt": 0})
    intermediate_size: int = field(default=128, metadata={"gt": 0})
    num_layers: int = field(default=2, metadata={"gt": 0})
    num_heads: int = field(default=4, metadata={"gt": 0})
    max_positions: int = field(default=256, metadata={"gt": 0})

    def __post_init__(self):
        check(self.hidden_size % self.num_heads == 0, "hidden_size",
              f"must be divisible by num_heads ({self.num_heads})")


@dataclass
class WorldConfig:
    """The synthetic pool: families of perturbed tiny Llamas, plus a corpus policy."""

    seed: int = 0
    content_vocab: int = field(default=256, metadata={"ge": 2, "le": MAX_CONTENT_VOCAB})
    families: int = field(default=6, metadata={"ge": 0})
    members_per_family: int = field(default=4, metadata={"ge": 1})
    within_sigma: float = field(default=0.25, metadata={"ge": 0})
    across_sigma: float | None = field(default=None, metadata={"ge": 0})
    logit_scale: float = field(default=1.0, metadata={"gt": 0})
    heldout_members_per_family: int = field(default=1, metadata={"ge": 0})
    heldout_families: int = field(default=0, metadata={"ge": 0})
    bridges: int = field(default=0, metadata={"ge": 0})
    arch: PolicyArch = field(default_factory=PolicyArch)

    def __post_init__(self):
        check(self.heldout_members_per_family < self.members_per_family,
              "heldout_members_per_family",
              f"must be below members_per_family ({self.members_per_family})")
        check(self.heldout_families <= self.families, "heldout_families",
              f"must be at most families ({self.families})")

    @property
    def vocab_size(self) -> int:
        return FIRST_CONTENT_ID + self.content_vocab


@dataclass(frozen=True)
class PolicySpec:
    """Identity and provenance of one pool member."""

    policy_id: str
    family: str
    member: int
    split: str  # "train" or "heldout"
    seed: int


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any printable parts (same on every machine and run)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def pool_specs(cfg: WorldConfig) -> list[PolicySpec]:
    """All pool members, family-major (ids ``f{family}m{member}``), then the bridges (ids
    ``b{a}-{b}t{i}``, pair-major)."""
    specs = []
    for f in range(cfg.families):
        heldout_family = f >= cfg.families - cfg.heldout_families
        for m in range(cfg.members_per_family):
            heldout = heldout_family or m >= cfg.members_per_family - cfg.heldout_members_per_family
            specs.append(PolicySpec(f"f{f}m{m}", f"f{f}", m, "heldout" if heldout else "train",
                                    derive_seed(cfg.seed, "member", f, m)))
    first_heldout = cfg.families - cfg.heldout_families
    for a in range(cfg.families):
        for b in range(a + 1, cfg.families):
            for i in range(1, cfg.bridges + 1):
                pid = f"b{a}-{b}t{i}"
                specs.append(PolicySpec(pid, pid, 0, "heldout" if b >= first_heldout else "train",
                                        derive_seed(cfg.seed, "bridge", a, b, i)))
    return specs


def bridge_ends(policy_id: str) -> tuple[int, int, int] | None:
    """``(a, b, i)`` of a bridge id ``b{a}-{b}t{i}``; None for any other id."""
    m = re.fullmatch(r"b(\d+)-(\d+)t(\d+)", policy_id)
    return None if m is None else tuple(int(x) for x in m.groups())


class World:
    """Builds the pool's policies on demand (family bases are cached)."""

    def __init__(self, cfg: WorldConfig, sampling: SamplingConfig | None = None):
        self.cfg = cfg
        self.sampling = sampling or SamplingConfig()
        self.specs = pool_specs(cfg)
        self._bases: dict[int, dict[str, torch.Tensor]] = {}
        self._root: dict[str, torch.Tensor] | None = None
        self._names = [(n, tuple(p.shape)) for n, p in _new_model(cfg).named_parameters()]

    def spec(self, policy_id: str) -> PolicySpec:
        for s in self.specs:
            if s.policy_id == policy_id:
                return s
        raise KeyError(f"no policy {policy_id!r} in the pool")

    def policy(self, policy_id: str) -> SyntheticPolicy:
        spec = self.spec(policy_id)
        ends = bridge_ends(policy_id)
        if ends is not None:
            a, b, i = ends
            params = _interpolate(self._family_base(a), self._family_base(b),
                                  i / (self.cfg.bridges + 1))
        else:
            params = self._family_base(int(spec.family[1:]))
        if spec.member > 0:
            params = _perturb(params, self.cfg.within_sigma, spec.seed)
        return SyntheticPolicy(_load(self.cfg, params), policy_id=spec.policy_id,
                               family=spec.family, seed=spec.seed, sampling=self.sampling)

    def policies(self, split: str | None = None) -> list[SyntheticPolicy]:
        return [self.policy(s.policy_id) for s in self.specs if split in (None, s.split)]

    def corpus_policy(self) -> SyntheticPolicy:
        """The policy whose documents the prompts are cut from (in no family, never sampled
        as A or B); it never emits EOS, so every document has the requested length."""
        seed = derive_seed(self.cfg.seed, CORPUS_ID)
        return SyntheticPolicy(_load(self.cfg, self._draw(seed)), policy_id=CORPUS_ID,
                               family=CORPUS_ID, seed=seed, sampling=self.sampling,
                               allow_eos=False)

    def _draw(self, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        hidden, scale = self.cfg.arch.hidden_size, self.cfg.logit_scale
        out = {}
        for name, shape in self._names:
            if len(shape) == 1:
                out[name] = torch.ones(shape)
            elif "embed_tokens" in name:
                out[name] = torch.randn(shape, generator=g)
            elif "lm_head" in name:
                out[name] = torch.randn(shape, generator=g) * (scale / hidden ** 0.5)
            else:
                out[name] = torch.randn(shape, generator=g) / shape[1] ** 0.5
        return out

    def _family_base(self, family: int) -> dict[str, torch.Tensor]:
        if family not in self._bases:
            if self.cfg.across_sigma is None:
                self._bases[family] = self._draw(derive_seed(self.cfg.seed, "family", family))
            else:
                if self._root is None:
                    self._root = self._draw(derive_seed(self.cfg.seed, "root"))
                self._bases[family] = _perturb(self._root, self.cfg.across_sigma,
                                               derive_seed(self.cfg.seed, "family", family))
        return self._bases[family]


def sample_prompts(corpus: SyntheticPolicy, count: int, min_len: int, max_len: int,
                   doc_len: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """``count`` corpus documents of ``doc_len`` tokens and, for each, a prompt that is its
    prefix of a length uniform in [min_len, max_len]. Returns (prompts, documents)."""
    if not 1 <= min_len <= max_len <= doc_len:
        raise ValueError(f"need 1 <= min_len ({min_len}) <= max_len ({max_len}) <= doc_len "
                         f"({doc_len})")
    docs = corpus.generate([[] for _ in range(count)], seed=seed, max_new_tokens=doc_len)
    lengths = np.random.default_rng(seed).integers(min_len, max_len + 1, size=count)
    return [d[:n] for d, n in zip(docs, lengths.tolist(), strict=True)], docs


# --------------------------------------------------------------------------- internals


def _new_model(cfg: WorldConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    a = cfg.arch
    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size, num_hidden_layers=a.num_layers,
        num_attention_heads=a.num_heads, num_key_value_heads=a.num_heads,
        max_position_embeddings=a.max_positions, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):  # HF init draws from the global RNG; weights are
        return LlamaForCausalLM(config).eval()  # overwritten, so keep the caller's RNG intact


def _load(cfg: WorldConfig, params: dict[str, torch.Tensor]):
    model = _new_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
        model.requires_grad_(False)
    return model


def _perturb(params: dict[str, torch.Tensor], sigma: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in params.items():
        if w.ndim == 1:
            out[name] = w.clone()
            continue
        noise = torch.randn(w.shape, generator=g)
        out[name] = (w + sigma * w.std() * noise) / (1.0 + sigma ** 2) ** 0.5
    return out


def _interpolate(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                 t: float) -> dict[str, torch.Tensor]:
    """``(1−t)·a + t·b`` per tensor, rescaled to the spread ``(1−t)·std(a) + t·std(b)`` (the
    mix of two independent draws is narrower; norm weights are equal in every policy)."""
    out = {}
    for name, wa in a.items():
        wb = b[name]
        mixed = (1.0 - t) * wa + t * wb
        if wa.ndim > 1:
            mixed = mixed * (((1.0 - t) * wa.std() + t * wb.std()) / mixed.std())
        out[name] = mixed
    return out
