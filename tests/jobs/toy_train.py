"""A tiny reward-model training job on random pairs, for engine and trainer tests.

usage: toy_train.py RUN_DIR ZERO_STAGE STEPS [nan_at_step] [sleep_per_step]
Launched as a plain process (world size 1) or under torchrun (world size 2).
"""

import os
import sys
import time

import torch

from polar_scaling.engine import EngineArgs, OptimArgs
from polar_scaling.losses import bradley_terry_loss, pair_metrics, pair_scores
from polar_scaling.model import RewardModel
from polar_scaling.rundir import RunDir
from polar_scaling.sizes import get_size, hf_config
from polar_scaling.trainer import ScheduleArgs, seed_everything, train

run_dir, zero, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
nan_at = int(sys.argv[4]) if len(sys.argv) > 4 else -1
sleep = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0


class RandomPairs:
    micro_batch, batch = 4, 16

    def __init__(self, n):
        self.num_steps = n
        self.grad_accum = self.batch // (self.micro_batch * int(os.environ.get("WORLD_SIZE", 1)))

    def micro_batches(self, step, rank, world):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(3, 50, (2 * self.batch, 24), generator=g)
        ids[self.batch:, :3] = 1  # the rejected half carries a learnable marker
        half = self.batch // world
        out = []
        for m in range(rank * half, (rank + 1) * half, self.micro_batch):
            sel = list(range(m, m + self.micro_batch))
            sel += [self.batch + i for i in sel]
            out.append({"input_ids": ids[sel], "step": step})
        return out

    def step_tokens(self, step):
        return 2 * self.batch * 24

    def step_flops(self, step):
        return 1000.0 * (step + 1)


def loss_fn(model, batch):
    if sleep:
        time.sleep(sleep)
    scores = model(batch["input_ids"])
    chosen, rejected = pair_scores(scores)
    loss = bradley_terry_loss(chosen, rejected)
    if batch["step"] == nan_at:
        loss = loss * float("nan")
    return loss, pair_metrics(chosen, rejected)


def evaluate(module):
    ids = torch.randint(3, 50, (8, 24), generator=torch.Generator().manual_seed(999))
    with torch.no_grad():
        return {"eval_score_mean": module(ids).mean().item()}


seed_everything(0)
model = RewardModel.from_config(hf_config(get_size("t25k").with_vocab(64), pad_token_id=0))
run = RunDir(run_dir)
run.init({"zero": zero, "steps": steps}, "toy")
train(run, model, EngineArgs(zero_stage=zero), OptimArgs(lr=3e-3),
      ScheduleArgs(eval_points=4, checkpoint_every=4, log_every=1, progress=False),
      RandomPairs(steps), loss_fn, evaluate,
      export=lambda module, state, r: module.save_pretrained(r.model_dir, state_dict=state))
