"""``polar-train finetune``: supervised fine-tuning of a reward model on ranked preferences.

POLAR's second stage (DESIGN.md §1): rows ``{prompt, reference, chosen, rejected}``
(:mod:`polar_scaling.preferences`), loss ``-log σ(r(p, ref, chosen) - r(p, ref, rejected))``.
The start (``model.base``) is one of:

* a reward-model folder (``RUN/model`` of a ``pretrain`` or ``finetune`` run): backbone *and*
  head are kept, the tokenizer saved beside it is used, and the wrapper and truncation limits
  recorded there are the defaults;
* a base-LM folder (``RUN/model`` of ``polar-train lm``, no reward head): its backbone with a
  new head, as pre-training starts;
* null: random weights of ladder size ``model.size``, with the tokenizer of
  ``model.tokenizer`` (a tokenizer folder, or a trajectory dataset holding ``tokenizer/``).

Training is ``epochs`` passes over the rows, each in a fresh order (whole batches only; the
few rows left over change from epoch to epoch), on the shared trainer and engine, so the run
directory, metrics, checkpoints and resume are those of pre-training. Evaluation on
``data.eval`` writes ``eval_loss`` / ``eval_accuracy`` and the same without the reference
(``eval_noref_*``, the reference slot left empty); at the end, per-category accuracy goes to
``RUN/eval_by_category.json`` and the model (head and tokenizer) to ``RUN/model``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from polar_scaling.config import check, load_config
from polar_scaling.engine import EngineArgs, OptimArgs
from polar_scaling.errors import StageError
from polar_scaling.rundir import RunDir, run_once
from polar_scaling.stage_args import Attention, BatchLayout, PairBatchArgs, choose_micro
from polar_scaling.trainer import ScheduleArgs


@dataclass
class FinetuneDataArgs:
    train: str | None = None  # preference JSONL (required)
    eval: str | None = None  # preference JSONL of other prompts (required)
    wrapper: Literal["sft", "pretrain"] | None = None  # None: the base model's, else sft
    max_length: int | None = field(default=None, metadata={"gt": 4})  # None: the base's
    max_response_length: int | None = field(default=None, metadata={"ge": 1})
    bucket_steps: int = field(default=4, metadata={"ge": 1})  # length-bucketing window

    def __post_init__(self):
        check(self.train is not None, "train", "required: a preference JSONL file")
        check(self.eval is not None, "eval", "required: a preference JSONL file")


@dataclass
class FinetuneModelArgs:
    base: str | None = None  # a reward-model or base-LM folder; None: random init
    size: str = "t100k"  # ladder size when base is None
    tokenizer: str | None = None  # when base is None: a tokenizer folder or a dataset dir
    trust_remote_code: bool = False
    # auto: packed_attention.best_packed_attention() for packed batches, sdpa for padded ones.
    attention: Attention = "auto"


@dataclass
class FinetuneArgs:
    data: FinetuneDataArgs = field(default_factory=FinetuneDataArgs)
    model: FinetuneModelArgs = field(default_factory=FinetuneModelArgs)
    epochs: int = field(default=1, metadata={"ge": 1})
    batch: PairBatchArgs = field(default_factory=lambda: PairBatchArgs(size=16))
    optim: OptimArgs = field(default_factory=lambda: OptimArgs(lr=3e-4, warmup_ratio=0.1))
    engine: EngineArgs = field(default_factory=EngineArgs)
    schedule: ScheduleArgs = field(default_factory=lambda: ScheduleArgs(eval_points=8))
    seed: int = 0

    def __post_init__(self):
        check(self.batch.micro is None or self.batch.size % self.batch.micro == 0, "batch.micro",
              "batch.size must be a multiple of batch.micro")
        check(self.model.base is not None or self.model.tokenizer is not None,
              "model.tokenizer", "required when model.base is null (training from scratch)")


def run(config_path: Path | None, overrides: list[str], run_dir: Path) -> dict:
    args = load_config(FinetuneArgs, config_path, overrides)
    return run_once(run_dir, args, "finetune", finetune)


# --------------------------------------------------------------------------- the start


def is_reward_model_folder(path: Path) -> bool:
    """True if ``path`` holds a reward model's weights (a ``score.weight`` head)."""
    from safetensors import safe_open

    from polar_scaling.model import WEIGHTS

    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        return False
    with safe_open(str(weights), "pt") as f:
        return "score.weight" in f.keys()


def _tokenizer_folder(path: Path) -> Path:
    return path / "tokenizer" if (path / "tokenizer").is_dir() else path


def load_start(margs: FinetuneModelArgs):
    """(model, ladder size, tokenizer, base meta) for the ``model`` section (module docstring)."""
    from polar_scaling.model import RewardModel
    from polar_scaling.pretrain import build_reward_model
    from polar_scaling.stage_args import ModelArgs
    from polar_scaling.tokenizer import reward_token_id

    if margs.base is None:
        tokenizer = _load_tokenizer(_tokenizer_folder(Path(margs.tokenizer)), "model.tokenizer")
        model, size = build_reward_model(ModelArgs(size=margs.size), tokenizer)
        return model, size, tokenizer, {}
    base = Path(margs.base)
    if not (base / "config.json").is_file():
        raise StageError(f"model.base {base} is not a model folder (no config.json)")
    try:
        if is_reward_model_folder(base):
            model = RewardModel.from_pretrained(base)
        else:
            model = RewardModel.from_base(base, trust_remote_code=margs.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise StageError(f"model.base {base}: cannot load it as a reward model or a base LM "
                         f"({type(e).__name__}: {e})") from None
    tok_dir = Path(margs.tokenizer) if margs.tokenizer is not None else base
    tokenizer = _load_tokenizer(_tokenizer_folder(tok_dir), "model.base" if margs.tokenizer
                                is None else "model.tokenizer")
    meta = dict(model.meta)
    if meta.get("encoding", "ids") != "ids":
        raise StageError(f"model.base {base} scores with the {meta['encoding']!r} encoding (a "
                         f"converted checkpoint); fine-tuning uses this suite's template")
    if model.config.vocab_size != len(tokenizer):
        raise StageError(f"model.base {base} has vocab {model.config.vocab_size} but its "
                         f"tokenizer has {len(tokenizer)}")
    rid = meta.get("reward_token_id")
    if rid is not None and rid != reward_token_id(tokenizer):
        raise StageError(f"model.base {base} was trained with reward token id {rid}, but the "
                         f"tokenizer's is {reward_token_id(tokenizer)}")
    return model, size_of(model.config, meta.get("size") or base.name), tokenizer, meta


def _load_tokenizer(path: Path, key: str):
    from polar_scaling.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise StageError(f"{key}: no usable tokenizer in {path} ({e})") from None


def size_of(config, name: str):
    """The :class:`~polar_scaling.sizes.ModelSize` of a loaded model's config (for FLOPs)."""
    from polar_scaling.sizes import ModelSize

    return ModelSize(str(name), config.hidden_size, config.num_hidden_layers,
                     config.num_attention_heads, config.num_key_value_heads,
                     config.intermediate_size, vocab=config.vocab_size)


# ---------------------------------------------------------------------------- the steps


class EpochSource:
    """``epochs`` passes of :class:`~polar_scaling.pairs.PairStepSource` over the pairs, each
    over its own permutation of them; a pure function of the step, like its parts."""

    def __init__(self, data, epochs: int, batch_size: int, micro: int, world: int, pad_id: int,
                 flops_fn, seed: int, bucket_steps: int, row_tokens: int | None = None,
                 compact: bool = False):
        from polar_scaling.pairs import PairData, PairStepSource

        self.parts = []
        for e in range(epochs):
            perm = np.random.default_rng([seed, e]).permutation(len(data))
            part = PairData([data.chosen[i] for i in perm], [data.rejected[i] for i in perm])
            whole = (len(part) // batch_size) * batch_size
            if whole == 0:
                raise StageError(f"the training set holds {len(part)} pairs, fewer than one "
                                 f"batch of {batch_size}; lower batch.size")
            self.parts.append(PairStepSource(
                part, batch_size, micro, world, pad_id, flops_fn,
                budget_tokens=float(part.tokens()[:whole].sum()), seed=seed + e,
                bucket_steps=bucket_steps, row_tokens=row_tokens, compact=compact))
        self.micro_batch = self.parts[0].micro_batch
        self.grad_accum = self.parts[0].grad_accum
        self._ends = np.cumsum([p.num_steps for p in self.parts])
        self.num_steps = int(self._ends[-1])

    def _locate(self, step: int):
        e = int(np.searchsorted(self._ends, step, side="right"))
        start = int(self._ends[e - 1]) if e else 0
        return self.parts[e], step - start

    def micro_batches(self, step: int, rank: int, world: int) -> list:
        part, local = self._locate(step)
        return part.micro_batches(local, rank, world)

    def step_tokens(self, step: int) -> int:
        part, local = self._locate(step)
        return part.step_tokens(local)

    def step_flops(self, step: int) -> float:
        part, local = self._locate(step)
        return part.step_flops(local)

    def pad_share(self, steps: int) -> float:
        """Share of padding in the micro-batches of the first ``steps`` steps (first epoch)."""
        return self.parts[0].pad_share(min(steps, self.parts[0].num_steps))


# ----------------------------------------------------------------------------- training


def finetune(args: FinetuneArgs, run: RunDir) -> dict:
    from polar_scaling.dist_env import init_distributed
    from polar_scaling.pairs import evaluate_pairs
    from polar_scaling.preferences import categories, encode_preferences, read_preferences
    from polar_scaling.sizes import non_embedding_params, total_params, train_flops
    from polar_scaling.trainer import seed_everything, train

    train_rows = read_preferences(args.data.train)
    eval_rows = read_preferences(args.data.eval)
    seed_everything(args.seed)
    model, size, tokenizer, base_meta = load_start(args.model)
    wrapper = args.data.wrapper or base_meta.get("wrapper") or "sft"
    max_length = args.data.max_length or base_meta.get("max_length")
    max_response_length = args.data.max_response_length or base_meta.get("max_response_length")
    limits = {"max_length": max_length, "max_response_length": max_response_length}
    _, world = init_distributed()
    pad = tokenizer.pad_token_id

    train_pairs = encode_preferences(train_rows, tokenizer, wrapper, **limits)
    evals = {"eval": encode_preferences(eval_rows, tokenizer, wrapper, **limits),
             "eval_noref": encode_preferences(eval_rows, tokenizer, wrapper,
                                              with_reference=False, **limits)}
    names, labels = categories(eval_rows)
    layout = BatchLayout.resolve(args.batch, args.model.attention, {"training": train_pairs, **evals})
    layout.apply(model)
    micro, micro_record = choose_micro(args.batch, args.engine, size, train_pairs, world, layout)
    source = EpochSource(train_pairs, args.epochs, args.batch.size, micro, world, pad,
                         lambda lens: train_flops(size, lens, head="reward"), args.seed,
                         args.data.bucket_steps, row_tokens=layout.row_tokens,
                         compact=layout.compact)

    def evaluate(module):
        row = {}
        for prefix, pairs in evals.items():
            res = evaluate_pairs(module, pairs, pad, **layout.eval_kwargs())
            row[f"{prefix}_loss"], row[f"{prefix}_accuracy"] = res["loss"], res["accuracy"]
        return row

    def export(module, state, run_):
        module.meta.update({"reward_token_id": base_meta.get("reward_token_id") or
                            _reward_id(tokenizer), "wrapper": wrapper, "size": size.name,
                            "stage": "finetune", "base": args.model.base, **limits})
        module.save_pretrained(run_.model_dir, state_dict=state)
        tokenizer.save_pretrained(str(run_.model_dir))
        by_cat = {}
        for prefix, pairs in evals.items():
            res = evaluate_pairs(module, pairs, pad, bins=labels, **layout.eval_kwargs())
            by_cat[prefix] = {c: {"accuracy": res[f"acc_bin{k}"], "n": res[f"n_bin{k}"]}
                              for k, c in enumerate(names)}
        (run_.path / "eval_by_category.json").write_text(json.dumps(by_cat, indent=2))

    extra = {"size": size.name, "params": total_params(size),
             "non_embedding_params": non_embedding_params(size), "base": args.model.base,
             "train_pairs": len(train_pairs), "eval_pairs": len(eval_rows),
             "epochs": args.epochs, "wrapper": wrapper,
             "pad_share_first_steps": round(source.pad_share(20), 4), **layout.summary(), **micro_record}
    return train(run, model, args.engine, args.optim, args.schedule, source, layout.loss_fn(),
                 evaluate, export=export, summary_extra=extra)


def _reward_id(tokenizer) -> int:
    from polar_scaling.tokenizer import reward_token_id

    return reward_token_id(tokenizer)
