"""``polar-train lm``: next-token pre-training of a ladder size's base LM.

POLAR starts its reward models from a pre-trained LM (InternLM2.5 base), not from random
weights; this stage makes that start for the synthetic world. The text is the world's: the
corpus policy's samples and the training policies' trajectories on training prompts (never
held-out policies or prompts, so the reward model's held-out evaluations stay held out).
Documents (``[BOS] prompt response [EOS]``) form one stream cut into rows of ``seq_len``.

The result is an HF causal-LM folder (``RUN/model``, tokenizer included) that
``model.base`` of the pre-training and fine-tuning stages can name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polar_scaling.config import ConfigError, load_config
from polar_scaling.engine import EngineArgs, OptimArgs
from polar_scaling.errors import StageError
from polar_scaling.rundir import RunDir, run_once
from polar_scaling.stage_args import BatchArgs, BudgetArgs
from polar_scaling.trainer import ScheduleArgs


@dataclass
class LMDataArgs:
    dir: str = "runs/world"  # a trajectory dataset written by `polar-train generate`
    seq_len: int = field(default=256, metadata={"ge": 8})
    eval_rows: int = field(default=64, metadata={"ge": 1})


@dataclass
class LMArgs:
    size: str = "t100k"
    data: LMDataArgs = field(default_factory=LMDataArgs)
    budget: BudgetArgs = field(default_factory=lambda: BudgetArgs(tokens=2e6))
    batch: BatchArgs = field(default_factory=lambda: BatchArgs(size=16))
    optim: OptimArgs = field(default_factory=lambda: OptimArgs(lr=3e-3))
    engine: EngineArgs = field(default_factory=EngineArgs)
    schedule: ScheduleArgs = field(default_factory=lambda: ScheduleArgs(eval_points=8))
    seed: int = 0


class RowSource:
    """Optimizer steps over fixed-length token rows (a pure function of the step)."""

    def __init__(self, rows: np.ndarray, batch_size: int, micro: int, world: int,
                 flops_per_row: float, budget_tokens: float | None, budget_flops: float | None,
                 seed: int):
        if batch_size % (micro * world):
            raise StageError(f"batch.size {batch_size} is not a multiple of batch.micro {micro} "
                             f"x world size {world}")
        self.rows, self.batch_size, self.micro_batch = rows, batch_size, micro
        self.grad_accum = batch_size // (micro * world)
        self.order = np.random.default_rng(seed).permutation(len(rows))
        self._tokens = batch_size * rows.shape[1]
        self._flops = batch_size * flops_per_row
        max_steps = len(rows) // batch_size
        per_step = self._tokens if budget_flops is None else self._flops
        budget = budget_tokens if budget_flops is None else budget_flops
        self.num_steps = int(np.ceil(budget / per_step))
        if self.num_steps > max_steps:
            raise StageError(f"a budget of {budget:.3g} needs {self.num_steps} steps but the text "
                             f"holds {max_steps} steps of {batch_size} rows; generate more data "
                             f"rather than repeat it")

    def micro_batches(self, step: int, rank: int, world: int) -> list:
        import torch

        index = self.order[step * self.batch_size:(step + 1) * self.batch_size]
        per_rank = len(index) // world
        mine = index[rank * per_rank:(rank + 1) * per_rank]
        return [{"input_ids": torch.from_numpy(self.rows[mine[i:i + self.micro_batch]])}
                for i in range(0, len(mine), self.micro_batch)]

    def step_tokens(self, step: int) -> int:
        return self._tokens

    def step_flops(self, step: int) -> float:
        return self._flops


def lm_loss(model, batch):
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    return out.loss, {}


def text_rows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a token stream into rows of ``seq_len`` (the tail is dropped)."""
    n = len(stream) // seq_len
    return np.asarray(stream[:n * seq_len], dtype=np.int64).reshape(n, seq_len)


def heldout_stream(data_dir: Path, bos: int, eos: int) -> np.ndarray:
    """``[BOS] prompt response [EOS]`` of the training policies on held-out prompts."""
    from polar_scaling.data import TrajectoryDataset

    ds = TrajectoryDataset(data_dir)
    t = ds.load("heldout_prompts")
    heldout = {i for i, p in enumerate(ds.policies) if p["split"] == "heldout"}
    docs = [np.concatenate([[bos], t.prompts[i], t.responses[i], [eos] if t.ended[i] else []])
            for i in range(len(t)) if int(t.policy_index[i]) not in heldout]
    return np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)


def run(config_path: Path | None, overrides: list[str], run_dir: Path) -> dict:
    args = load_config(LMArgs, config_path, overrides)
    return run_once(run_dir, args, "lm", train_lm)


def train_lm(args: LMArgs, run: RunDir) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from polar_scaling.data import lm_sequences
    from polar_scaling.dist_env import init_distributed
    from polar_scaling.model import save_causal_lm
    from polar_scaling.sizes import flops_per_token, get_size, hf_config, non_embedding_params
    from polar_scaling.tokenizer import load_tokenizer
    from polar_scaling.trainer import seed_everything, train

    try:
        size = get_size(args.size)
    except KeyError as e:
        raise ConfigError("<config>", "size", str(e.args[0])) from None
    data_dir = Path(args.data.dir)
    if not (data_dir / "manifest.json").is_file():
        raise StageError(f"data.dir {data_dir} is not a trajectory dataset (no manifest.json)")
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    size = size.with_vocab(len(tokenizer)) if size.vocab is None else size
    _, world = init_distributed()
    seed_everything(args.seed)
    config = hf_config(size, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    train_rows = text_rows(lm_sequences(data_dir).values, args.data.seq_len)
    eval_rows = text_rows(heldout_stream(data_dir, tokenizer.bos_token_id, tokenizer.eos_token_id),
                          args.data.seq_len)[:args.data.eval_rows]
    if len(eval_rows) == 0:
        raise StageError(f"{data_dir} holds no held-out text for the LM evaluation")
    micro = args.batch.micro or max(1, args.batch.size // world)
    source = RowSource(train_rows, args.batch.size, micro, world,
                       args.data.seq_len * flops_per_token(size, args.data.seq_len, head="lm"),
                       args.budget.tokens, args.budget.flops, args.seed)

    def evaluate(module):
        return {"eval_lm_loss": evaluate_lm(module, eval_rows)}

    def export(module, state, run_):
        save_causal_lm(module, run_.model_dir, state)
        tokenizer.save_pretrained(str(run_.model_dir))

    extra = {"size": args.size, "non_embedding_params": non_embedding_params(size, "lm"),
             "stage": "lm"}
    return train(run, model, args.engine, args.optim, args.schedule, source, lm_loss,
                 evaluate, export=export, summary_extra=extra, loss_key="lm_loss")


def evaluate_lm(model, rows: np.ndarray, batch: int = 16) -> float:
    """Mean next-token loss over ``rows`` (all ranks compute it; rows are few)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            ids = torch.from_numpy(rows[i:i + batch]).to(device)
            out = model(input_ids=ids, labels=ids, use_cache=False)
            n = ids.numel() - ids.shape[0]
            total += out.loss.float().item() * n
            count += n
    model.train(was_training)
    return total / count
