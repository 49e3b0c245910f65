"""Scoring throughput: ``scoring.score`` (length-sorted batches) against a plain batched forward.

Both paths score the same items with the same model, encoding and batch size in one run:

- score: :func:`polar_scaling.scoring.score`, items validated, encoded and run in batches
  sorted by length, scores returned in input order;
- plain: the same encoding (:func:`encode_items`), then batches of consecutive items in input
  order (no sorting), each padded to its longest row.

Items are drawn like POLAR inputs (log-normal lengths: prompt median ``--prompt`` tokens,
reference and output median ``--response`` tokens, clipped to ``--max-response``) from the
synthetic world's character tokenizer, so one character is one token. The model is a
randomly initialised RewardModel of a ladder size (random weights cost what trained ones do).
Reported: items/s and real tokens/s of each path (best of ``--repeats``), their ratio, the
pad share of each batching, the encode time alone, the largest score difference between
the paths and the spread of the scores (so an all-equal output would show).

    python benchmarks/score_throughput.py --size t3.2m --items 256 --batch-size 16
    python benchmarks/score_throughput.py --size 1.8B --device cuda --dtype bfloat16 --items 1024
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polar_scaling.model import RewardModel  # noqa: E402
from polar_scaling.scoring import (  # noqa: E402
    encode_items,
    forward_scores,
    length_sorted_batches,
    score,
)
from polar_scaling.sizes import get_size, hf_config  # noqa: E402
from polar_scaling.tokenizer import build_world_tokenizer, content_char  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="t3.2m", help="ladder size (polar_scaling.sizes)")
    p.add_argument("--items", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt", type=int, default=60, help="median prompt tokens")
    p.add_argument("--response", type=int, default=150, help="median reference/output tokens")
    p.add_argument("--max-response", type=int, default=600)
    p.add_argument("--content-vocab", type=int, default=4000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    return p.parse_args(argv)


def make_items(n, args, rng):
    def text(median, lo, hi):
        k = int(np.clip(rng.lognormal(np.log(median), 0.8), lo, hi))
        return "".join(content_char(int(c)) for c in rng.integers(0, args.content_vocab, k))
    return [{"prompt": text(args.prompt, 4, 4 * args.prompt),
             "reference": text(args.response, 8, args.max_response),
             "output": text(args.response, 8, args.max_response)} for _ in range(n)]


def pad_share(lengths, batches):
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1.0 - sum(lengths) / padded


def timed(fn, device, repeats):
    best, result = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    rng = np.random.default_rng(args.seed)
    tok = build_world_tokenizer(args.content_vocab)
    size = get_size(args.size)
    torch.manual_seed(args.seed)
    with device:
        model = RewardModel.from_config(hf_config(size, vocab=len(tok), pad_token_id=tok.pad_token_id),
                                        {"reward_token_id": 4}, dtype=DTYPES[args.dtype]).eval()
    items = make_items(args.items, args, rng)
    pad = tok.pad_token_id

    def plain():
        seqs = encode_items(items, tok, "ids", 4)
        naive = [list(range(k, min(k + args.batch_size, len(seqs))))
                 for k in range(0, len(seqs), args.batch_size)]
        return forward_scores(model, seqs, naive, pad)

    def sorted_path():
        return score(items, model, tok, batch_size=args.batch_size)

    warm = items[:2 * args.batch_size]
    score(warm, model, tok, batch_size=args.batch_size)  # kernels, allocator, tokenizer caches
    seqs = encode_items(items, tok, "ids", 4)
    lengths = list(map(len, seqs))
    naive = [list(range(k, min(k + args.batch_size, len(seqs))))
             for k in range(0, len(seqs), args.batch_size)]
    t_encode, _ = timed(lambda: encode_items(items, tok, "ids", 4), device, args.repeats)
    t_plain, plain_scores = timed(plain, device, args.repeats)
    t_score, sorted_scores = timed(sorted_path, device, args.repeats)
    diff = float(np.max(np.abs(np.asarray(plain_scores) - np.asarray(sorted_scores))))
    out = {
        "size": args.size, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)", "dtype": args.dtype,
        "items": args.items, "batch_size": args.batch_size,
        "tokens_mean": float(np.mean(lengths)), "tokens_max": int(max(lengths)),
        "score_items_per_s": args.items / t_score, "plain_items_per_s": args.items / t_plain,
        "score_tokens_per_s": sum(lengths) / t_score, "plain_tokens_per_s": sum(lengths) / t_plain,
        "ratio": t_plain / t_score, "encode_s": t_encode, "score_s": t_score, "plain_s": t_plain,
        "pad_share_sorted": pad_share(lengths, length_sorted_batches(lengths, args.batch_size)),
        "pad_share_plain": pad_share(lengths, naive), "max_abs_score_diff": diff,
        "score_std": float(np.std(sorted_scores)),
    }
    print(f"{out['device']}, size {args.size} ({args.dtype}), {args.items} items of "
          f"{out['tokens_mean']:.0f} tokens on average (max {out['tokens_max']}), "
          f"batch {args.batch_size}")
    print(f"  score(), length-sorted : {out['score_items_per_s']:8.1f} items/s "
          f"{out['score_tokens_per_s']:10.0f} tokens/s  pad share {out['pad_share_sorted']:.1%}")
    print(f"  plain batched forward  : {out['plain_items_per_s']:8.1f} items/s "
          f"{out['plain_tokens_per_s']:10.0f} tokens/s  pad share {out['pad_share_plain']:.1%}")
    print(f"  ratio score/plain      : {out['ratio']:.2f}x   (encoding alone {t_encode:.3f} s "
          f"of {t_score:.3f} s; max |score diff| {diff:.2e}, score std "
          f"{out['score_std']:.2e})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
