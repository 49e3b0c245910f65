"""Batches of (chosen, rejected) reward-model inputs for the shared trainer, and their loss
and evaluation. Pre-training (same-policy vs other-policy candidates) and fine-tuning
(human chosen vs rejected) both train on pairs of encoded sequences, so both use this.

Each micro-batch is one forward pass over ``[chosen_0..chosen_{m-1}, rejected_0..]``.
Length bucketing: a window of ``bucket_steps`` optimizer steps is sorted by length and cut
into steps, and the steps of the window are then shuffled, so a step holds examples of
similar length (little padding) while the order stays a pure function of the step number.

Packing (``row_tokens`` given): a micro-batch holds the same pairs, but its sequences are
packed first-fit-decreasing into as many rows as they need, of the width at most
``row_tokens`` that needs the fewest slots (:func:`polar_scaling.packing.fit_row_width`),
instead of being padded to the longest; so a packed micro-batch never holds more padding
than the padded one, and the loss is the same up to float rounding, since attention stays
inside each sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from polar_scaling.errors import StageError
from polar_scaling.losses import bradley_terry_loss, pair_metrics, pair_scores, per_pair_loss
from polar_scaling.packing import PackedBatch, pack_pairs


@dataclass
class PairData:
    """Encoded pairs: ``chosen[i]`` should outscore ``rejected[i]``."""

    chosen: list[np.ndarray]
    rejected: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.chosen)

    def tokens(self) -> np.ndarray:
        """Real (non-pad) tokens of each pair, both sequences."""
        return np.array([len(c) + len(r) for c, r in zip(self.chosen, self.rejected, strict=True)],
                        dtype=np.int64)


def pad_right(seqs: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def collate_pairs(data: PairData, index: np.ndarray, pad_id: int, swap: np.ndarray | None = None,
                  row_tokens: int | None = None, compact: bool = False):
    """One forward-pass batch for pairs ``index``; ``swap[i]`` exchanges pair i's sides.

    Padded (``{"input_ids", "attention_mask"}``, rows ``[chosen..., rejected...]``), or with
    ``row_tokens`` a :class:`~polar_scaling.packing.PackedBatch` whose scores come out in
    the same order; ``compact`` drops the rows' padding tails (one row of the sequences
    alone, for kernels that read boundaries from positions: PackedBatch.compact).
    """
    chosen = [data.chosen[i] for i in index]
    rejected = [data.rejected[i] for i in index]
    if swap is not None:
        for j, i in enumerate(index):
            if swap[i]:
                chosen[j], rejected[j] = rejected[j], chosen[j]
    if row_tokens:
        packed = pack_pairs(chosen, rejected, row_tokens, pad_id, fit_width=True)
        return packed.compact() if compact else packed
    ids, mask = pad_right(chosen + rejected, pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def score_batch(model, batch, attention: str = "sdpa") -> torch.Tensor:
    """Scores of a padded batch or a PackedBatch, in its ``[chosen..., rejected...]`` order.

    ``attention`` is the model's kernel: kernels that only separate sequences in a single
    row get the rows flattened (:func:`polar_scaling.packed_attention.packed_inputs`).
    """
    from polar_scaling.packed_attention import packed_inputs

    device = next(model.parameters()).device
    if isinstance(batch, PackedBatch):
        return model(**packed_inputs(batch.to(device), attention))
    return model(batch["input_ids"].to(device), batch["attention_mask"].to(device))


def pair_loss(model, batch, attention: str = "sdpa") -> tuple[torch.Tensor, dict]:
    """Bradley-Terry loss and metrics of one micro-batch (padded or packed)."""
    chosen, rejected = pair_scores(score_batch(model, batch, attention))
    return bradley_terry_loss(chosen, rejected), pair_metrics(chosen, rejected)


def batch_slots(batch) -> tuple[int, int]:
    """(real tokens, token slots) of a padded batch or a PackedBatch."""
    if isinstance(batch, PackedBatch):
        return batch.real_tokens, batch.slots
    return int(batch["attention_mask"].sum()), batch["attention_mask"].numel()


def resolve_row_tokens(row_tokens: int, sets: dict[str, PairData]) -> int:
    """The packed row width: ``row_tokens``, or for 0 the smallest power of two that holds
    the longest sequence of ``sets`` (name -> pairs). A sequence longer than an explicit
    ``row_tokens`` is a StageError naming the longest such sequence (set, side, index)."""
    longest = max((len(s) for d in sets.values() for side in (d.chosen, d.rejected)
                   for s in side), default=1)
    fit = 1 << max(0, math.ceil(math.log2(longest)))
    if row_tokens == 0:
        return fit
    too_long = [(len(s), name, side, i) for name, d in sets.items()
                for side, seqs in (("chosen", d.chosen), ("rejected", d.rejected))
                for i, s in enumerate(seqs) if len(s) > row_tokens]
    if too_long:
        n, name, side, i = max(too_long, key=lambda t: t[0])
        raise StageError(
            f"batch.row_tokens={row_tokens} is shorter than {side} sequence {i} of the {name} "
            f"pairs ({n} tokens; {len(too_long)} sequences do not fit); raise "
            f"batch.row_tokens, or set it to 0 for the smallest power of two that holds "
            f"every sequence ({fit} here)")
    return row_tokens


class PairStepSource:
    """Optimizer steps over pairs, for :func:`polar_scaling.trainer.train`.

    ``num_steps`` is the smallest number of whole steps whose tokens (or FLOPs) reach the
    budget; a budget that would need more pairs than ``data`` holds is an error, since
    repeating data would bend a scaling curve.

    ``row_tokens`` packs each micro-batch into rows of that width (see the module
    docstring); the steps, their pairs and their micro-batches are those of the padded
    source.
    """

    def __init__(self, data: PairData, batch_size: int, micro: int, world: int, pad_id: int,
                 flops_fn, budget_tokens: float | None = None, budget_flops: float | None = None,
                 seed: int = 0, bucket_steps: int = 16, swap: np.ndarray | None = None,
                 row_tokens: int | None = None, compact: bool = False):
        if batch_size % (micro * world):
            raise StageError(f"batch.size {batch_size} is not a multiple of batch.micro {micro} "
                             f"x world size {world}")
        self.data, self.pad_id, self.swap, self.row_tokens = data, pad_id, swap, row_tokens
        self.compact = compact
        self.batch_size, self.micro_batch = batch_size, micro
        self.grad_accum = batch_size // (micro * world)
        n_steps_max = len(data) // batch_size
        if n_steps_max < 1:
            raise StageError(f"the data holds {len(data)} pairs, fewer than one batch of {batch_size}")
        usable = n_steps_max * batch_size
        self.order = _bucketed_order(data.tokens()[:usable], batch_size, bucket_steps, seed)
        pair_tokens = data.tokens()[self.order].reshape(n_steps_max, batch_size)
        self._tokens = pair_tokens.sum(1)
        self._flops = np.array([flops_fn(self._lengths(s)) for s in range(n_steps_max)])
        cum = np.cumsum(self._tokens if budget_flops is None else self._flops)
        budget = budget_tokens if budget_flops is None else budget_flops
        if budget > cum[-1]:
            what = "tokens" if budget_flops is None else "FLOPs"
            raise StageError(
                f"a budget of {budget:.3g} {what} needs more data than the dataset holds "
                f"({cum[-1]:.3g} {what} in {len(data)} pairs); generate more trajectories "
                f"rather than repeat data")
        if budget < cum[0]:
            raise StageError(f"the budget ({budget:.3g}) is smaller than one optimizer step "
                             f"({cum[0]:.3g})")
        self.num_steps = int(np.searchsorted(cum, budget) + 1)

    def _step_index(self, step: int) -> np.ndarray:
        return self.order[step * self.batch_size:(step + 1) * self.batch_size]

    def _lengths(self, step: int) -> list[int]:
        idx = self._step_index(step)
        return [len(self.data.chosen[i]) for i in idx] + [len(self.data.rejected[i]) for i in idx]

    def micro_batches(self, step: int, rank: int, world: int) -> list:
        index = self._step_index(step)
        per_rank = len(index) // world
        mine = index[rank * per_rank:(rank + 1) * per_rank]
        return [collate_pairs(self.data, mine[i:i + self.micro_batch], self.pad_id, self.swap,
                              self.row_tokens, self.compact)
                for i in range(0, len(mine), self.micro_batch)]

    def step_tokens(self, step: int) -> int:
        return int(self._tokens[step])

    def step_flops(self, step: int) -> float:
        return float(self._flops[step])

    def pad_share(self, steps: int | None = None) -> float:
        """Share of padding in the micro-batches (padded or packed) of the first ``steps``
        steps: 1 - real tokens / token slots."""
        real = slots = 0
        for step in range(steps or self.num_steps):
            for mb in self.micro_batches(step, 0, 1):
                r, n = batch_slots(mb)
                real, slots = real + r, slots + n
        return 1.0 - real / slots


def _bucketed_order(tokens: np.ndarray, batch_size: int, bucket_steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(tokens))
    if bucket_steps <= 1:
        return order
    window = batch_size * bucket_steps
    out = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(tokens[chunk], kind="stable")]
        steps = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        for j in rng.permutation(len(steps)):
            out.append(steps[j])
    return np.concatenate(out)


@torch.no_grad()
def evaluate_pairs(model, data: PairData, pad_id: int, batch: int = 64,
                   bins: np.ndarray | None = None, row_tokens: int | None = None,
                   attention: str = "sdpa", compact: bool = False) -> dict:
    """Mean BT loss and accuracy over all pairs (split across ranks, summed with all-reduce).

    ``bins[i]`` (optional int labels) adds per-bin accuracy as ``acc_bin{k}`` / ``n_bin{k}``.
    ``row_tokens`` packs each pass of ``batch`` pairs into rows for kernel ``attention``.
    """
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n_bins = int(bins.max()) + 1 if bins is not None and len(bins) else 0
    sums = torch.zeros(3 + 2 * n_bins, dtype=torch.float64)  # loss, correct, count, per bin
    index = np.arange(len(data))
    # Every rank runs the same number of forward passes (ZeRO-3 gathers are collective).
    per_rank = math.ceil(len(index) / world)
    mine = index[rank * per_rank:(rank + 1) * per_rank]
    n_passes = math.ceil(per_rank / batch)
    for k in range(n_passes):
        part = mine[k * batch:(k + 1) * batch]
        if len(part) == 0:
            part, weight = index[:1], 0.0  # a dummy pass keeps ranks in step
        else:
            weight = 1.0
        b = collate_pairs(data, part, pad_id, row_tokens=row_tokens, compact=compact)
        scores = score_batch(model, b, attention).double().cpu()
        chosen, rejected = pair_scores(scores)
        correct = (chosen > rejected).double() + 0.5 * (chosen == rejected).double()
        sums[0] += weight * per_pair_loss(chosen, rejected).sum()
        sums[1] += weight * correct.sum()
        sums[2] += weight * len(part)
        if n_bins:
            labels = torch.as_tensor(bins[part])
            sums[3:3 + n_bins] += weight * torch.bincount(labels, weights=correct, minlength=n_bins)
            sums[3 + n_bins:] += weight * torch.bincount(labels, minlength=n_bins).double()
    if world > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    model.train(was_training)
    out = {"loss": (sums[0] / sums[2]).item(), "accuracy": (sums[1] / sums[2]).item()}
    for k in range(n_bins):
        n = sums[3 + n_bins + k].item()
        out[f"acc_bin{k}"] = sums[3 + k].item() / n if n else float("nan")
        out[f"n_bin{k}"] = int(n)
    return out
