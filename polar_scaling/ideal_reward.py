"""The Bayes-optimal POLAR discriminator of a synthetic world (``reward.mode: ideal``).

POLAR pre-training shows a reward model triplets (prompt x, reference r, candidate y): r is
sampled from a training-pool policy p drawn uniformly; y is a positive (another sample of
p) or a negative (a sample of a policy q drawn from p's negatives: another family, or with
probability ``same_family_share`` another member of p's family). In a synthetic world every
policy is known, so the log-odds that a triplet is a positive, which a reward model trained
on infinite data with unlimited capacity converges to, can be written down:

    ideal(x, r, y) = log sum_p p(r|x) p(y|x) - log sum_p p(r|x) sum_q w(q|p) q(y|x)

with ``w(q|p)`` the chance that q writes p's negative. Scored against a target reference,
this is close to ``log target(y) - log mix(y)`` with ``mix`` the pool's negatives, not to
the oracle's ``log target(y) - log π(y)``; how close RFT gets with it is the most a reward
model trained by the POLAR objective on this pool could give, and how well a trained RM's
scores track it says how far that RM is from its objective's optimum.

Likelihoods are of the pool's full distributions (temperature 1; the dataset's top-p/top-k
truncation is ignored, so a response no policy's truncated sampler could write still gets a
finite score). A response shorter than ``max_new_tokens`` ended with EOS (stripped before
scoring) and gets that EOS's probability too; one of full length was cut at the cap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

Ids = list[int]


def negative_weights(families: Sequence[str], same_family_share: float) -> np.ndarray:
    """``w[p, q]``: the chance that policy q writes policy p's negative (rows sum to 1): a
    ``same_family_share`` over p's family members (if any), the rest over other families."""
    fam = np.asarray(families)
    n = len(fam)
    same = (fam[:, None] == fam[None, :]) & ~np.eye(n, dtype=bool)
    other = fam[:, None] != fam[None, :]
    w = np.zeros((n, n))
    for p in range(n):
        s = same_family_share if same[p].any() and other[p].any() else float(same[p].any())
        if same[p].any():
            w[p, same[p]] = s / same[p].sum()
        if other[p].any():
            w[p, other[p]] = (1 - s) / other[p].sum()
    return w


class IdealReward:
    """Callable like :class:`polar_scaling.rft_rollout.RMReward`: (prompts, references,
    responses without EOS) -> one float64 score per triplet."""

    def __init__(self, data_dir: str | Path, max_new_tokens: int, same_family_share: float = 0.0):
        from polar_scaling.rft_rollout import _load_world

        world, _, _, _ = _load_world(Path(data_dir))
        self.policies = world.policies("train")
        if len(self.policies) < 2:
            from polar_scaling.errors import StageError

            raise StageError(f"reward.mode=ideal: the world of {data_dir} has fewer than two "
                             f"training policies, so it has no negatives")
        self.cap = int(max_new_tokens)
        w = negative_weights([p.family for p in self.policies], same_family_share)
        with np.errstate(divide="ignore"):
            self.log_w = torch.from_numpy(np.log(w))  # [P, Q], -inf where q is never p's

    def _loglik(self, prompts: Sequence[Ids], responses: Sequence[Ids]) -> torch.Tensor:
        """[P, n]: each training policy's log-probability of each response (with its EOS
        when it is shorter than the cap); repeated (prompt, response) pairs computed once."""
        keys = [(tuple(p), tuple(r)) for p, r in zip(prompts, responses, strict=True)]
        index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        unique = list(index)
        where = torch.tensor([index[k] for k in keys], dtype=torch.long)
        out = []
        for pol in self.policies:
            eos = pol.eos_ids[0]
            seqs = [list(r) + ([eos] if len(r) < self.cap else []) for _, r in unique]
            out.append([float(lp.sum()) for lp in pol.logprobs([list(p) for p, _ in unique],
                                                                 seqs)])
        return torch.tensor(out, dtype=torch.float64)[:, where]

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Ids], references: Sequence[Ids],
                 responses: Sequence[Ids]) -> torch.Tensor:
        lr = self._loglik(prompts, references)  # [P, n]
        ly = self._loglik(prompts, responses)  # [Q, n]
        pos = torch.logsumexp(lr + ly, dim=0)
        neg_y = torch.logsumexp(self.log_w[:, :, None] + ly[None, :, :], dim=1)  # [P, n]
        neg = torch.logsumexp(lr + neg_y, dim=0)
        return pos - neg
