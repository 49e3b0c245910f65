"""Packing variable-length POLAR sequences into fixed-size rows, and the padded alternative.

A POLAR sequence (``prompt + reference + <reward> + prompt + candidate`` ending with its
reward token) is a list of token ids. Packing places whole sequences into rows of
``row_tokens`` by first-fit-decreasing; ``position_ids`` restart at 0 at every sequence and
at the padding that ends a row, which is how attention kernels tell sequences apart (see
:mod:`polar_scaling.packed_attention`). ``score_index`` holds the flat index (into
``rows * row_tokens``) of each sequence's last token, in the input order, so a batch laid
out as ``[chosen..., rejected...]`` splits with :func:`polar_scaling.losses.pair_scores`.

:func:`fit_row_width` picks, for one micro-batch, the row width (at most ``row_tokens``)
that needs the fewest slots, which the training stages use: a micro-batch much smaller
than a row, or of similar lengths (length bucketing), then does not pay for a mostly empty
row, and never needs more slots than padding to its longest sequence.

For comparison, :func:`pad_sequences` and :func:`length_batches` build ordinary padded
batches, with or without length bucketing; :func:`padded_pad_share` measures their waste.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [R, L] long
    position_ids: torch.Tensor  # [R, L] long, restarting at 0 per sequence and per pad tail
    score_index: torch.Tensor  # [N] long, flat index into R*L of each sequence's last token
    seq_lens: torch.Tensor  # [N] long, in input order

    @property
    def real_tokens(self) -> int:
        return int(self.seq_lens.sum())

    @property
    def slots(self) -> int:
        return self.input_ids.numel()

    @property
    def pad_share(self) -> float:
        """Share of row slots holding padding rather than sequence tokens."""
        return 1.0 - self.real_tokens / self.slots

    def flattened(self) -> PackedBatch:
        """The same tokens as one row ``[1, R*L]``; ``score_index`` is unchanged.

        Kernels that infer sequence boundaries only for a batch of one (transformers'
        flash-attention path) need this form; rows start at position 0, so row boundaries
        stay sequence boundaries.
        """
        return PackedBatch(self.input_ids.reshape(1, -1), self.position_ids.reshape(1, -1),
                           self.score_index, self.seq_lens)

    def compact(self) -> PackedBatch:
        """The sequences alone, back to back in one row ``[1, real_tokens]``: no padding.

        For kernels that take sequence boundaries from ``position_ids`` over a flattened
        batch (``polar_varlen``, flash attention), a row's width is arbitrary, so the
        padding tails of packed rows are dropped rather than computed. Every sequence still
        starts at position 0; ``score_index`` points into the new row.
        """
        ends = self.score_index.reshape(-1)
        starts = ends - self.seq_lens + 1
        slot = torch.zeros(self.input_ids.numel() + 1, dtype=torch.long)
        slot.index_add_(0, starts.cpu(), torch.ones_like(starts.cpu()))
        slot.index_add_(0, (ends + 1).cpu(), -torch.ones_like(ends.cpu()))
        real = slot[:-1].cumsum(0) > 0
        real = real.to(self.input_ids.device)
        new_index = real.long().cumsum(0) - 1
        return PackedBatch(self.input_ids.reshape(-1)[real].unsqueeze(0),
                           self.position_ids.reshape(-1)[real].unsqueeze(0),
                           new_index[self.score_index], self.seq_lens)

    def to(self, device) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device),
                           self.score_index.to(device), self.seq_lens.to(device))


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each summing to at most ``capacity``.

    Items are taken longest first (ties by index) and each goes into the first bin with
    room, so the result depends only on ``lengths`` and ``capacity``. Within a bin indices
    are ascending. An item longer than ``capacity`` is a ValueError.
    """
    too_long = [(i, n) for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"sequence {i} has {n} tokens, more than a row of {capacity} "
                         f"({len(too_long)} such sequences); raise row_tokens")
    if any(n < 1 for n in lengths):
        raise ValueError("every sequence needs at least one token (its reward token)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


def fit_row_width(lengths: Sequence[int], row_tokens: int) -> int:
    """The row width, at most ``row_tokens``, at which ``lengths`` pack into the fewest slots.

    A micro-batch far smaller than a row, or of similar lengths, wastes most of a fixed
    ``row_tokens`` row; packing first-fit-decreasing at a narrower capacity and cutting rows
    to their fullest one avoids that. Tried: the longest sequence (one sequence per row at
    worst, so never more slots than padding to the longest), ``row_tokens``, and
    ``ceil(total / k)`` for every row count ``k`` in between. Ties go to the narrower width
    (a dense attention mask costs rows x width^2). Deterministic in its arguments.
    """
    longest, total = max(lengths), sum(lengths)
    if longest > row_tokens:
        first_fit_decreasing(lengths, row_tokens)  # raises, naming the sequence
    candidates = {longest, row_tokens}
    candidates |= {w for k in range(1, len(lengths) + 1)
                   if longest <= (w := -(-total // k)) <= row_tokens}
    best = None
    for cap in sorted(candidates):
        bins = first_fit_decreasing(lengths, cap)
        width = max(sum(lengths[i] for i in b) for b in bins)
        if best is None or len(bins) * width < best[0]:
            best = (len(bins) * width, width)
    return best[1]


def pack_sequences(seqs: Sequence[Sequence[int]], row_tokens: int, pad_id: int,
                   min_rows: int = 0) -> PackedBatch:
    """Pack ``seqs`` into rows of ``row_tokens`` (first-fit-decreasing).

    Returns at least ``min_rows`` rows (extra rows are all padding, so a fixed micro-batch
    shape can be kept). Each row's padding tail gets positions 0, 1, ... of its own, so it
    forms a segment of its own and no sequence attends to it.
    """
    lengths = [len(s) for s in seqs]
    bins = first_fit_decreasing(lengths, row_tokens)
    rows = max(len(bins), min_rows)
    input_ids = torch.full((rows, row_tokens), pad_id, dtype=torch.long)
    position_ids = torch.zeros((rows, row_tokens), dtype=torch.long)
    score_index = torch.empty(len(seqs), dtype=torch.long)
    for r, items in enumerate(bins):
        col = 0
        for i in items:
            n = lengths[i]
            input_ids[r, col:col + n] = torch.as_tensor(seqs[i], dtype=torch.long)
            position_ids[r, col:col + n] = torch.arange(n)
            score_index[i] = r * row_tokens + col + n - 1
            col += n
        position_ids[r, col:] = torch.arange(row_tokens - col)
    for r in range(len(bins), rows):
        position_ids[r] = torch.arange(row_tokens)
    return PackedBatch(input_ids, position_ids, score_index,
                       torch.as_tensor(lengths, dtype=torch.long))


def pack_pairs(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]],
               row_tokens: int, pad_id: int, fit_width: bool = False) -> PackedBatch:
    """Pack pairs so that scores come out as ``[chosen..., rejected...]`` (see pair_scores).

    ``fit_width``: rows of :func:`fit_row_width` (at most ``row_tokens``) instead of exactly
    ``row_tokens``.
    """
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected sequences")
    seqs = list(chosen) + list(rejected)
    if fit_width:
        row_tokens = fit_row_width([len(s) for s in seqs], row_tokens)
    return pack_sequences(seqs, row_tokens, pad_id)


def group_pairs(pair_lens: Sequence[tuple[int, int]], row_tokens: int,
                rows: int) -> list[list[int]]:
    """Split pairs, in order, into micro-batches whose sequences pack into ``rows`` rows.

    Pairs are taken in data order and a micro-batch is closed when the next pair would not
    fit; a pair that alone needs more than ``rows`` rows gets a micro-batch of its own (two
    rows at most, since each sequence fits a row). Deterministic in its arguments.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    for i, (a, b) in enumerate(pair_lens):
        first_fit_decreasing([a, b], row_tokens)  # a sequence longer than a row: ValueError
        trial = current + [i]
        lens = [pair_lens[j][0] for j in trial] + [pair_lens[j][1] for j in trial]
        if current and (sum(lens) > rows * row_tokens
                        or len(first_fit_decreasing(lens, row_tokens)) > rows):
            groups.append(current)
            trial = [i]
        current = trial
    if current:
        groups.append(current)
    return groups


# ------------------------------------------------------------------------- padded batches


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right",
                  pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of shape ``[B, max(len, pad_to)]``, padded on ``side``."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be left or right, got {side!r}")
    width = max([len(s) for s in seqs] + [pad_to or 0])
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[r, cols] = torch.as_tensor(s, dtype=torch.long)
        mask[r, cols] = 1
    return ids, mask


def length_batches(lengths: Sequence[int], batch_size: int, bucket: bool) -> list[list[int]]:
    """Index batches of ``batch_size`` items.

    ``bucket=False``: in data order. ``bucket=True``: items sorted by length (ties by index)
    before chunking, so each batch holds similar lengths; batches come out shortest first
    (a trainer shuffles the batch order with its own seed).
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i)) if bucket \
        else list(range(len(lengths)))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padded_pad_share(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of slots that are padding when each batch is padded to its longest item."""
    real = sum(lengths[i] for b in batches for i in b)
    slots = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 1.0 - real / slots if slots else 0.0
