"""``polar-train rft``: reinforcement fine-tuning of a policy by PPO with a POLAR reward.

Each step: a batch of prompts; a reference answer per prompt (written by the target policy
on the fly, or read from the prompt file); ``samples_per_prompt`` rollouts per prompt from
the actor with HF ``generate`` (temperature 1, top-p / top-k configurable); the reward
model's score of (prompt, reference, rollout) as the reward at the rollout's last token;
then ``ppo.epochs`` passes of clipped PPO over minibatches (:mod:`polar_scaling.rft_ppo`).
As in the POLAR paper: GAE with γ = λ = 1, clip 0.2, a critic initialised from the policy,
a frozen copy of the initial policy for an optional KL penalty (``ppo.kl_coef``, default 0).

Reward modes (``reward.mode``): ``rm`` (the POLAR reward model in ``reward.model``), and
controls: ``untrained_rm`` (the same architecture with fresh random weights), ``random``
(noise independent of the rollout) and ``oracle`` (per-token ``log target - log π``, whose
expected sum is minus the true KL: the best any reward could do); ``oracle_sequence`` (the
oracle's sum as one score per rollout, placed like an RM's: what a perfectly aligned
sequence-level reward could do); and in a synthetic world ``ideal`` (the Bayes-optimal POLAR
discriminator of the world's pool, :mod:`polar_scaling.ideal_reward`: the optimum of the
pre-training objective that a trained RM approximates). Options against length
artefacts and reward noise: ``policy.allow_eos=false`` (every policy writes exactly
``max_new_tokens`` tokens), ``reward.references`` (mean score over several target
references) and ``reward.normalize`` (scores centred or whitened per prompt group).

Actor and critic are two DeepSpeed :class:`~polar_scaling.engine.Engine` s with their own
optimizers; checkpoints hold both (``checkpoints/actor/N`` and ``checkpoints/critic/N``,
each marked complete) plus the step, token count and RNG state; a run resumes from the
newest step both hold. Every random draw (prompt order, references, rollouts, minibatch
order, random rewards) is seeded from (seed, step, rank), so a resumed run writes the same
metrics.jsonl as an uninterrupted one. Timings go to ``perf.jsonl``.

In a synthetic world the metrics also hold the *true* sequence KL of the training policy to
the target on held-out prompts (``true_kl``; :mod:`polar_scaling.kl`), at step 0 and at
log-spaced steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from polar_scaling.config import check, load_config
from polar_scaling.engine import EngineArgs, OptimArgs
from polar_scaling.rundir import RunDir, run_once
from polar_scaling.trainer import ScheduleArgs


@dataclass
class RFTDataArgs:
    dir: str | None = "runs/world"  # a synthetic-world dataset (`polar-train generate`)
    prompts: str | None = None  # JSONL of {"prompt", "reference"}; overrides the dataset's


@dataclass
class PolicyArgs:
    init: str = "f0m0"  # a pool policy id of data.dir's world, or a local causal-LM folder
    target: str | None = "f1m0"  # writes the references; None: references from data.prompts
    trust_remote_code: bool = False
    # False: EOS is suppressed for every policy of the run (init, target, actor), so
    # rollouts, references and the true-KL samples are all exactly max_new_tokens long and
    # the true KL (of these fixed-length distributions) can only move through content.
    allow_eos: bool = True


@dataclass
class RewardArgs:
    mode: Literal["rm", "untrained_rm", "random", "oracle", "oracle_sequence", "ideal"] = "rm"
    model: str | None = None  # a reward-model folder (a pretrain run's RUN/model)
    batch_size: int = field(default=64, metadata={"ge": 1})
    # Target references per prompt; a rollout's reward is its mean RM score over them (less
    # reward noise than one reference). More than one needs policy.target.
    references: int = field(default=1, metadata={"ge": 1})
    # Scores per prompt group (the samples_per_prompt rollouts of one prompt) before the KL
    # penalty: none; group (minus the group mean); group_whiten (also over the group's sd).
    normalize: Literal["none", "group", "group_whiten"] = "none"
    # reward.mode=ideal: the share of the pool's negatives that come from the reference
    # policy's own family (as data.same_family_share of the RMs it stands for)
    same_family_share: float = field(default=0.0, metadata={"ge": 0, "le": 1})

    def __post_init__(self):
        check(self.mode not in ("rm", "untrained_rm") or self.model is not None, "model",
              f"reward.mode={self.mode} needs reward.model (a reward-model folder)")
        check(self.mode != "oracle" or self.normalize == "none", "normalize",
              "the oracle's reward is per token: use reward.normalize=none")


@dataclass
class RolloutArgs:
    prompts_per_step: int = field(default=32, metadata={"ge": 1})
    samples_per_prompt: int = field(default=2, metadata={"ge": 1})
    max_new_tokens: int | None = field(default=None, metadata={"ge": 1})  # None: the data's
    temperature: float = field(default=1.0, metadata={"gt": 0})
    # No truncation by default: PPO's ratios are then exact for the sampling distribution.
    top_p: float = field(default=1.0, metadata={"gt": 0, "le": 1})
    top_k: int = field(default=0, metadata={"ge": 0})


@dataclass
class PPOArgs:
    epochs: int = field(default=2, metadata={"ge": 1})
    minibatch: int = field(default=32, metadata={"ge": 1})  # rollouts per optimizer step
    micro: int | None = field(default=None, metadata={"ge": 1})  # per rank; None: minibatch
    clip: float = field(default=0.2, metadata={"gt": 0})
    value_clip: float | None = field(default=0.2, metadata={"gt": 0})
    gamma: float = field(default=1.0, metadata={"ge": 0, "le": 1})
    lam: float = field(default=1.0, metadata={"ge": 0, "le": 1})
    kl_coef: float = field(default=0.0, metadata={"ge": 0})
    whiten_advantages: bool = True


@dataclass
class RFTBudgetArgs:
    """At most one of PPO steps or rollout tokens (at the response cap: steps =
    ceil(tokens / (rollouts per step x max_new_tokens))); neither means 100 steps."""

    steps: int | None = field(default=None, metadata={"ge": 1})
    tokens: float | None = field(default=None, metadata={"gt": 0})

    def __post_init__(self):
        if self.steps is None and self.tokens is None:
            self.steps = 100
        check(self.steps is None or self.tokens is None, "steps",
              "give exactly one of budget.steps and budget.tokens")


@dataclass
class EvalArgs:
    prompts: int = field(default=32, metadata={"ge": 1})  # held-out prompts for the true KL
    samples_per_prompt: int = field(default=4, metadata={"ge": 1})


# Defaults live on subclasses rather than in default factories: a partial override such as
# ``optim.lr=...`` rebuilds the section from its class, so factory defaults would be lost.
@dataclass
class ActorOptimArgs(OptimArgs):
    # Paper scale: actor 1e-6, critic 1e-5; tiny CPU policies need far larger (docs/rft.md).
    lr: float = field(default=1e-3, metadata={"gt": 0})
    warmup_ratio: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    min_lr_ratio: float = field(default=1.0, metadata={"ge": 0, "le": 1})


@dataclass
class CriticOptimArgs(ActorOptimArgs):
    lr: float = field(default=3e-3, metadata={"gt": 0})


@dataclass
class RFTScheduleArgs(ScheduleArgs):
    eval_points: int = field(default=8, metadata={"ge": 1})  # true-KL evaluations, log-spaced
    eval_first_fraction: float = field(default=0.05, metadata={"gt": 0, "le": 1})
    checkpoint_every: int = field(default=20, metadata={"ge": 1})  # PPO steps
    log_every: int = field(default=1, metadata={"ge": 1})


@dataclass
class RFTArgs:
    data: RFTDataArgs = field(default_factory=RFTDataArgs)
    policy: PolicyArgs = field(default_factory=PolicyArgs)
    reward: RewardArgs = field(default_factory=RewardArgs)
    rollout: RolloutArgs = field(default_factory=RolloutArgs)
    ppo: PPOArgs = field(default_factory=PPOArgs)
    budget: RFTBudgetArgs = field(default_factory=RFTBudgetArgs)
    optim: ActorOptimArgs = field(default_factory=ActorOptimArgs)
    critic_optim: CriticOptimArgs = field(default_factory=CriticOptimArgs)
    engine: EngineArgs = field(default_factory=EngineArgs)
    schedule: RFTScheduleArgs = field(default_factory=RFTScheduleArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    seed: int = 0

    def __post_init__(self):
        rollouts = self.rollout.prompts_per_step * self.rollout.samples_per_prompt
        check(rollouts % self.ppo.minibatch == 0, "ppo.minibatch",
              f"must divide the rollouts per step ({rollouts})")
        check(self.ppo.micro is None or self.ppo.minibatch % self.ppo.micro == 0, "ppo.micro",
              "must divide ppo.minibatch")
        check(self.engine.zero_stage < 3, "engine.zero_stage",
              "rollouts run generate on the actor's full weights: use ZeRO 0-2")
        check(not self.reward.mode.startswith("oracle") or self.policy.target is not None,
              "reward.mode", f"the {self.reward.mode} reward needs policy.target")
        check(self.reward.mode != "ideal" or self.data.dir is not None, "reward.mode",
              "the ideal reward is that of a synthetic world's pool: it needs data.dir")
        check(self.reward.references == 1 or self.policy.target is not None,
              "reward.references", "several references per prompt need policy.target "
              "(a prompt file holds one reference per prompt)")
        check(self.reward.normalize == "none" or self.rollout.samples_per_prompt > 1,
              "reward.normalize", "group normalisation needs rollout.samples_per_prompt > 1")


ARGS = RFTArgs  # the sweep manager looks the stage's config class up by this name


def run(config_path: Path | None, overrides: list[str], run_dir: Path) -> dict:
    args = load_config(RFTArgs, config_path, overrides)
    return run_once(run_dir, args, "rft", train_rft)


def num_steps(budget: RFTBudgetArgs, rollouts: int, max_new_tokens: int) -> int:
    """PPO steps of a budget (a token budget counts every rollout at the response cap)."""
    if budget.steps is not None:
        return budget.steps
    return max(1, math.ceil(budget.tokens / (rollouts * max_new_tokens)))


def train_rft(args: RFTArgs, run: RunDir) -> dict:
    """Run PPO to the end of the budget (resuming from the run's checkpoints) and export the
    actor to ``RUN/model``; returns the summary also written to ``done.json``."""
    from polar_scaling.dist_env import init_distributed
    from polar_scaling.errors import StageError
    from polar_scaling.rft_loop import PPOStep, load_pair, save_pair, summarize
    from polar_scaling.rundir import MetricsLog
    from polar_scaling.trainer import (
        StopSignals,
        eval_steps,
        restore_rng,
        rng_state,
        seed_everything,
    )

    rank, world = init_distributed()
    if (args.rollout.prompts_per_step % world or args.ppo.minibatch % world):
        raise StageError(f"rollout.prompts_per_step and ppo.minibatch must be multiples of the "
                         f"world size ({world})")
    seed_everything(args.seed)
    ppo = PPOStep(args, run, rank, world)
    total = ppo.num_steps
    metrics = MetricsLog(run.metrics_path, enabled=rank == 0)
    state = load_pair(ppo.actor, ppo.critic, run.checkpoints)
    start, tokens = 0, 0
    if state is not None:
        start, tokens = state["step"], state["rollout_tokens"]
        restore_rng(state["rng"])
    metrics.truncate_after(start if state is not None else -1)
    evals = eval_steps(total, args.schedule.eval_points, args.schedule.eval_first_fraction)
    if start == 0 and ppo.can_eval:
        metrics.write({"step": 0, "rollout_tokens": 0, **ppo.evaluate()})
    bar = None
    if args.schedule.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, unit="step", desc="rft", dynamic_ncols=True,
                   mininterval=1.0)
    wall0, last_good, timings = time.time(), start, []
    with StopSignals() as stop:
        for step in range(start, total):
            row, timing = ppo.step(step)
            for key in ("policy_loss", "value_loss"):
                if not math.isfinite(row[key]):
                    raise StageError(
                        f"non-finite {key} ({row[key]}) at step {step + 1}; the last good "
                        f"checkpoint is step {last_good} in {run.checkpoints} (lower optim.lr?)")
            tokens += row.pop("step_rollout_tokens")
            done = step + 1
            timing["step"] = done
            timings.append(timing)
            if done % args.schedule.log_every == 0 or done in evals or done == total:
                metrics.write({"step": done, "rollout_tokens": tokens, **row})
                ppo.log_perf(timing)
            if done in evals and ppo.can_eval:
                t0 = time.time()
                metrics.write({"step": done, "rollout_tokens": tokens, **ppo.evaluate()})
                timing["eval_s"] = time.time() - t0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", refresh=False)
            stopping = stop.received is not None
            if done % args.schedule.checkpoint_every == 0 or done == total or stopping:
                save_pair(ppo.actor, ppo.critic, run.checkpoints, done,
                          {"step": done, "rollout_tokens": tokens, "rng": rng_state()},
                          args.schedule.keep_checkpoints)
                last_good = done
            if stopping:
                if bar is not None:
                    bar.close()
                stop.forward()
    if bar is not None:
        bar.close()
    summary = summarize(run, total, tokens, time.time() - wall0, timings, world, rank)
    if rank == 0:
        ppo.export(run)
        run.mark_done(summary)
    return summary
