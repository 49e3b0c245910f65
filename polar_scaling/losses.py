"""Bradley-Terry losses for POLAR pre-training and ranking fine-tuning.

Both stages compare two candidates read against the same reference:
``L = -log σ(r(p, ref, better) - r(p, ref, worse))``. In pre-training "better" is the
reference policy's second trajectory, "worse" the other policy's; in fine-tuning they are
the human-ranked chosen and rejected answers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log σ(chosen - rejected)``, computed stably with softplus."""
    return F.softplus(rejected - chosen).mean()


def pair_scores(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split one forward pass over ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]``."""
    if scores.shape[0] % 2:
        raise ValueError(f"expected an even number of scores, got {scores.shape[0]}")
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


@torch.no_grad()
def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Accuracy (ties count half), margin and reward statistics of a batch of pairs."""
    margin = (chosen - rejected).float()
    rewards = torch.cat([chosen, rejected]).float()
    accuracy = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()
    return {
        "accuracy": accuracy.item(),
        "margin": margin.mean().item(),
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std(unbiased=False).item(),
    }


def per_pair_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """``-log σ(chosen - rejected)`` for each pair (for evaluation sums across ranks)."""
    return F.softplus(rejected - chosen)
