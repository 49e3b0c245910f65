"""PPO for reinforcement fine-tuning: the rollout batch layout, per-token GAE, the clipped
policy and value losses, and the critic (a value head on a copy of the policy's backbone).

Layout. Rollout ``i`` is ``head_i + response_i``, where ``head_i`` is the policy's prefix
tokens (e.g. BOS) plus the prompt and ``response_i`` the sampled tokens (EOS included when
the policy stopped). Rows are right-padded, so every real token sits at its natural position.
Response step ``t`` is predicted from position ``len(head_i) - 1 + t``: the actor's logits
there give the log-probability of the token, and the critic's value there is ``V(s_t)``, the
value of the state before the token is emitted.

Rewards are per token: ``r_t = -kl_coef · (log π(y_t) - log π_ref(y_t))`` plus the sequence
reward at the last token. With γ = λ = 1 (the paper's setting) GAE reduces to
``A_t = Σ_{k≥t} r_k - V(s_t)``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn


@dataclass
class RolloutBatch:
    """Padded rollouts (``N`` rows, ``W`` positions, ``T`` response steps)."""

    input_ids: torch.Tensor  # [N, W]
    attention_mask: torch.Tensor  # [N, W]
    positions: torch.Tensor  # [N, T] index into W of the logits/value for response step t
    tokens: torch.Tensor  # [N, T] response tokens (0 where masked)
    mask: torch.Tensor  # [N, T] bool, True on real response tokens

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> RolloutBatch:
        return RolloutBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def select(self, index: Sequence[int] | torch.Tensor) -> RolloutBatch:
        """Rows ``index``, trimmed to the widest selected row."""
        index = torch.as_tensor(index, dtype=torch.long)
        mask = self.attention_mask[index]
        width = int(mask.sum(1).max()) if len(index) else 0
        steps = int(self.mask[index].sum(1).max()) if len(index) else 0
        return RolloutBatch(self.input_ids[index, :width], mask[:, :width],
                            self.positions[index, :steps].clamp(max=max(width - 1, 0)),
                            self.tokens[index, :steps], self.mask[index, :steps])


def collate_rollouts(heads: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                     pad_id: int) -> RolloutBatch:
    """The batch layout of the module docstring. Every response must hold at least one token."""
    if len(heads) != len(responses):
        raise ValueError(f"{len(heads)} heads but {len(responses)} responses")
    if any(len(h) == 0 for h in heads):
        raise ValueError("every rollout needs a non-empty head (prefix + prompt)")
    if any(len(r) == 0 for r in responses):
        raise ValueError("every rollout needs at least one response token")
    n = len(heads)
    width = max(len(h) + len(r) for h, r in zip(heads, responses, strict=True))
    steps = max(len(r) for r in responses)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    tokens = torch.zeros((n, steps), dtype=torch.long)
    mask = torch.zeros((n, steps), dtype=torch.bool)
    starts = torch.zeros(n, dtype=torch.long)
    for i, (h, r) in enumerate(zip(heads, responses, strict=True)):
        row = list(h) + list(r)
        ids[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        attn[i, :len(row)] = 1
        tokens[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = True
        starts[i] = len(h) - 1
    positions = (starts[:, None] + torch.arange(steps)[None, :]).clamp(max=width - 1)
    return RolloutBatch(ids, attn, positions, tokens, mask)


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x[i, positions[i, t]]`` for ``x`` of shape [N, W] or [N, W, V]."""
    if x.dim() == 2:
        return x.gather(1, positions)
    return x.gather(1, positions[:, :, None].expand(-1, -1, x.shape[-1]))


def token_logprobs(logits: torch.Tensor, batch: RolloutBatch,
                   suppress_ids: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the response tokens under ``logits`` [N, W, V] and the entropy of
    each step's distribution, both [N, T] and 0 off the mask. Tokens in ``suppress_ids``
    (never sampled) get probability 0, so these are the log-probabilities of the sampling
    distribution."""
    picked = gather_positions(logits, batch.positions).float()
    if suppress_ids:
        picked[..., list(suppress_ids)] = float("-inf")
    logp_all = torch.log_softmax(picked, dim=-1)
    logp = logp_all.gather(-1, batch.tokens[..., None]).squeeze(-1)
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    # Padding steps hold token 0, often a suppressed id (log-prob -inf): zero them, so that
    # masked sums never meet -inf · 0.
    zero = torch.zeros_like(logp)
    return torch.where(batch.mask, logp, zero), torch.where(batch.mask, entropy, zero)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, logp: torch.Tensor | None = None,
                  ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0) -> torch.Tensor:
    """Per-token rewards [N, T]: the sequence score at each row's last response token, minus
    ``kl_coef`` times the sampled-token log-ratio to the reference policy at every token."""
    rewards = torch.zeros(mask.shape, dtype=torch.float64)
    if kl_coef:
        rewards -= kl_coef * (logp.double() - ref_logp.double()) * mask
    last = mask.long().sum(1) - 1
    rewards[torch.arange(len(last)), last] += scores.double()
    return rewards


def normalize_groups(scores: torch.Tensor, group_size: int, mode: str) -> torch.Tensor:
    """Sequence scores with each group of ``group_size`` consecutive rollouts (one prompt's
    samples) centred on its mean (``group``), and also divided by its sd (``group_whiten``;
    a group whose scores are all equal becomes 0); ``none`` returns them unchanged."""
    if mode == "none":
        return scores
    g = scores.double().view(-1, group_size)
    out = g - g.mean(1, keepdim=True)
    if mode == "group_whiten":
        out = out / g.std(1, unbiased=False, keepdim=True).clamp(min=1e-8)
    elif mode != "group":
        raise ValueError(f"unknown normalisation {mode!r}")
    return out.view(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns, both [N, T], zero where ``mask`` is False.

    The episode ends after each row's last response token (its next value is 0). Padding is
    on the right only, as :func:`collate_rollouts` lays it out.
    """
    rewards, values = rewards.double(), values.double()
    n, steps = mask.shape
    adv = torch.zeros((n, steps), dtype=torch.float64)
    running = torch.zeros(n, dtype=torch.float64)
    next_value = torch.zeros(n, dtype=torch.float64)
    for t in reversed(range(steps)):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(valid, delta + gamma * lam * running, torch.zeros_like(running))
        next_value = torch.where(valid, values[:, t], torch.zeros_like(next_value))
        adv[:, t] = running
    returns = (adv + values) * mask
    return adv, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(x - mean) / std`` on the masked entries, 0 elsewhere."""
    return ((x - mean) / max(std, 1e-8)) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (a token mean) and its clip fraction and approx KL to the
    rollout policy (k3 estimator, ``E[(r - 1) - log r]``)."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask).item()
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask).item()
    return loss, {"clip_frac": clip_frac, "ppo_approx_kl": approx_kl}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Half the mean squared error to the returns; with ``clip``, the larger of the plain and
    the clipped-update error (values may move at most ``clip`` from the rollout's)."""
    err = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        err = torch.maximum(err, (clipped - returns) ** 2)
    return 0.5 * masked_mean(err, mask)


class ValueModel(nn.Module):
    """The critic: a decoder backbone plus a linear value head read at every position."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.model = backbone
        self.config = backbone.config
        self.value_head = nn.Linear(hidden_size, 1)
        # Zero init: the first values are 0, so the first advantages are the raw returns.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_policy(cls, policy_model: nn.Module) -> ValueModel:
        """A critic whose backbone is a copy of the causal LM's (its LM head dropped)."""
        backbone = copy.deepcopy(getattr(policy_model, policy_model.base_model_prefix))
        backbone.requires_grad_(True)
        return cls(backbone, policy_model.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            use_cache=False).last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()
