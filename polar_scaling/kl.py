"""True distance between policies: sequence-level KL(p || q) on held-out prompts.

The KL is between the policies' *full* distributions (temperature 1, no top-k/top-p; see
:mod:`polar_scaling.policies`) over responses of at most ``max_new_tokens`` tokens, ending at
EOS or at the cap, averaged over prompts:

    KL(p || q) = E_x E_{y ~ p(.|x)} [ log p(y|x) - log q(y|x) ]

Monte-Carlo over samples y ~ p with exact log-probabilities. The main estimate sums, along
each sampled y, the exact per-step KL between the two next-token distributions
(``sum_t KL(p(.|x,y<t) || q(.|x,y<t))``): it has the same expectation as the plain
log-ratio and lower variance. Both are reported; per-token KL is the sequence KL divided by
the mean number of tokens p emits (EOS included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from polar_scaling.policies import Policy


@dataclass(frozen=True)
class KLEstimate:
    kl_per_sequence: float  # the Rao-Blackwellised estimate (exact per-step KL summed)
    stderr_per_sequence: float
    kl_per_token: float
    kl_log_ratio: float  # the plain estimate: mean of log p(y) - log q(y)
    mean_length: float  # tokens per response of p, EOS included
    samples: int


class Samples:
    """Responses sampled from p's full distribution and p's log-distributions along them."""

    def __init__(self, p: Policy, prompts: Sequence[Sequence[int]], samples_per_prompt: int,
                 seed: int, max_new_tokens: int | None = None):
        self.prompts = [list(x) for x in prompts for _ in range(samples_per_prompt)]
        self.responses = p.generate(prompts, num_samples=samples_per_prompt, seed=seed,
                                    full_distribution=True, max_new_tokens=max_new_tokens)
        self.logp, self.mask = p.log_distributions(self.prompts, self.responses)
        self.tokens = torch.zeros(self.mask.shape, dtype=torch.long)
        for i, r in enumerate(self.responses):
            self.tokens[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)


def kl_from_samples(s: Samples, q: Policy) -> KLEstimate:
    """KL(p || q) from samples of p (see :class:`Samples`) and q's exact log-probabilities."""
    logq, _ = q.log_distributions(s.prompts, s.responses)
    if logq.shape != s.logp.shape:
        raise ValueError(f"policies disagree on the vocabulary: {tuple(s.logp.shape)} vs "
                         f"{tuple(logq.shape)}")
    p = s.logp.exp()
    # 0·log 0 = 0 where p masks a token; where q masks a token p can emit, KL is infinite.
    diff = torch.where(p > 0, s.logp - logq, torch.zeros_like(p))
    step_kl = (p * diff).sum(-1).masked_fill(~s.mask, 0.0).double()
    per_seq = step_kl.sum(1).numpy()
    lp = s.logp.gather(-1, s.tokens[..., None]).squeeze(-1)
    lq = logq.gather(-1, s.tokens[..., None]).squeeze(-1)
    log_ratio = (lp - lq).masked_fill(~s.mask, 0.0).double().sum(1).numpy()
    n = len(per_seq)
    mean_len = float(s.mask.sum()) / max(n, 1)
    kl_seq = float(per_seq.mean()) if n else float("nan")
    stderr = float(per_seq.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return KLEstimate(kl_seq, stderr, kl_seq / mean_len if mean_len else float("nan"),
                      float(log_ratio.mean()) if n else float("nan"), mean_len, n)


def sequence_kl(p: Policy, q: Policy, prompts: Sequence[Sequence[int]],
                samples_per_prompt: int = 4, seed: int = 0,
                max_new_tokens: int | None = None) -> KLEstimate:
    """Estimate KL(p || q) over ``prompts`` (ids without prefix tokens), sampling from p."""
    return kl_from_samples(Samples(p, prompts, samples_per_prompt, seed, max_new_tokens), q)


def kl_matrix(policies: Sequence[Policy], prompts: Sequence[Sequence[int]],
              samples_per_prompt: int = 4, seed: int = 0,
              max_new_tokens: int | None = None) -> list[dict]:
    """KL(a || b) for every ordered pair (a == b included, as a check: it is exactly 0).

    One row per pair: policy_a, policy_b, family_a, family_b, same_family, kl_per_sequence,
    stderr_per_sequence, kl_per_token, kl_log_ratio, mean_length_a, samples.
    """
    rows = []
    for a in policies:
        rows.extend(kl_rows_for(a, policies, prompts, samples_per_prompt, seed, max_new_tokens))
    return rows


def kl_rows_for(a: Policy, policies: Sequence[Policy], prompts, samples_per_prompt: int,
                seed: int, max_new_tokens: int | None = None) -> list[dict]:
    """The rows of :func:`kl_matrix` whose first policy is ``a`` (a unit of parallel work)."""
    s = Samples(a, prompts, samples_per_prompt, seed, max_new_tokens)
    rows = []
    for b in policies:
        est = kl_from_samples(s, b)
        rows.append({
            "policy_a": a.policy_id, "policy_b": b.policy_id, "family_a": a.family,
            "family_b": b.family, "same_family": a.family == b.family,
            "kl_per_sequence": est.kl_per_sequence, "stderr_per_sequence": est.stderr_per_sequence,
            "kl_per_token": est.kl_per_token, "kl_log_ratio": est.kl_log_ratio,
            "mean_length_a": est.mean_length, "samples": est.samples})
    return rows


def summarize_kl(rows: Sequence[dict]) -> dict:
    """Mean per-token and per-sequence KL within a family vs across families (a ≠ b)."""
    out = {}
    for name, same in (("within", True), ("across", False)):
        sel = [r for r in rows if r["same_family"] == same and r["policy_a"] != r["policy_b"]]
        out[name] = {
            "pairs": len(sel),
            "kl_per_token": float(np.mean([r["kl_per_token"] for r in sel])) if sel else None,
            "kl_per_sequence": float(np.mean([r["kl_per_sequence"] for r in sel])) if sel else None,
        }
    return out
