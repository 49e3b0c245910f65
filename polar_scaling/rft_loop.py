"""One RFT step on two DeepSpeed engines (actor and critic), their joint checkpoints, the
true-KL evaluation and the run summary. The loop around them is
:func:`polar_scaling.rft.train_rft`; the PPO arithmetic is :mod:`polar_scaling.rft_ppo`.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from polar_scaling.engine import Engine, complete_checkpoints
from polar_scaling.fused import fuse_kernels
from polar_scaling.ideal_reward import IdealReward
from polar_scaling.model import save_causal_lm
from polar_scaling.policies import SamplingConfig
from polar_scaling.rft_ppo import (
    RolloutBatch,
    ValueModel,
    collate_rollouts,
    gae,
    gather_positions,
    normalize_groups,
    policy_loss,
    token_logprobs,
    token_rewards,
    value_loss,
    whiten,
)
from polar_scaling.rft_rollout import (
    RandomReward,
    RMReward,
    actor_view,
    load_setup,
    oracle_token_rewards,
    place_frozen,
    step_prompts,
    strip_eos,
    trainable_copy,
)
from polar_scaling.world import derive_seed


class PPOStep:
    """The models, engines and data of one RFT run; :meth:`step` runs one PPO step."""

    def __init__(self, args, run, rank: int, world: int):
        from polar_scaling.rft import num_steps

        self.args, self.run, self.rank, self.world = args, run, rank, world
        s = self.setup = load_setup(args.data.dir, args.data.prompts, args.policy.init,
                                    args.policy.target, args.eval.prompts,
                                    args.rollout.max_new_tokens, args.policy.trust_remote_code,
                                    args.policy.allow_eos)
        mode = args.reward.mode
        if mode in ("rm", "untrained_rm"):
            untrained = derive_seed(args.seed, "untrained-rm") if mode == "untrained_rm" else None
            self.reward = RMReward(args.reward.model, s.tokenizer, args.reward.batch_size,
                                   untrained_seed=untrained)
        elif mode == "random":
            self.reward = RandomReward(args.seed)
        elif mode == "ideal":
            self.reward = IdealReward(args.data.dir, s.max_new_tokens,
                                      args.reward.same_family_share)
        else:
            self.reward = None  # oracle: per-token rewards from the target's log-probabilities
        r = args.rollout
        rollouts = r.prompts_per_step * r.samples_per_prompt
        self.num_steps = num_steps(args.budget, rollouts, s.max_new_tokens)
        self.rollouts_rank = rollouts // world
        self.minibatch = args.ppo.minibatch // world
        self.micro = min(args.ppo.micro or self.minibatch, self.minibatch)
        if self.minibatch % self.micro:
            from polar_scaling.errors import StageError

            raise StageError(f"ppo.micro ({self.micro}) must divide the per-rank minibatch "
                             f"({self.minibatch})")
        updates = args.ppo.epochs * (self.rollouts_rank // self.minibatch)
        accum = self.minibatch // self.micro
        actor_model = trainable_copy(s.init)
        critic_model = ValueModel.from_policy(s.init.model)
        self.actor = Engine(actor_model, args.engine, args.optim, self.num_steps * updates,
                            self.micro, accum, run.path)
        self.critic = Engine(critic_model, args.engine, args.critic_optim,
                             self.num_steps * updates, self.micro, accum, None)
        # The reference gets the actor's kernels too, so that the two agree until it moves.
        fuse_kernels(s.init.model, args.engine.fused_kernels, self.actor.device)
        place_frozen(s, self.reward, self.actor.device,
                     next(self.actor.module.parameters()).dtype)
        sampling = SamplingConfig(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                  max_new_tokens=s.max_new_tokens,
                                  batch_size=max(self.rollouts_rank, 1))
        self.policy = actor_view(s.init, self.actor.module, sampling)
        # The evaluation samples in one batch of its own, so its draws do not depend on the
        # rollout batch (nor on the world size).
        n_eval = max(len(s.eval_prompts) * args.eval.samples_per_prompt, 1)
        self.eval_policy = actor_view(s.init, self.actor.module, SamplingConfig(
            max_new_tokens=s.max_new_tokens, batch_size=n_eval))
        self.can_eval = s.target is not None and bool(s.eval_prompts)
        self._target_samples = None

    # ------------------------------------------------------------------------- one step

    def step(self, step: int) -> tuple[dict, dict]:
        """Rollouts, rewards and PPO updates of step ``step`` (0-based). Returns the metrics
        row (reduced over ranks; ``step_rollout_tokens`` is this step's count) and timings."""
        a, s = self.args, self.setup
        t0 = time.time()
        batch, prompts, responses, refs = self.rollout(step)
        t1 = time.time()
        old_logp, entropy, ref_logp, values = self.forward_all(batch)
        n = len(responses)
        if a.reward.mode == "oracle":
            per_token = oracle_token_rewards(s.target, prompts, responses, old_logp, batch.mask)
            scores = per_token.sum(1)
            rewards = per_token + token_rewards(torch.zeros(n), batch.mask, old_logp, ref_logp,
                                                a.ppo.kl_coef)
        else:
            if a.reward.mode == "random":
                scores = self.reward.scores(n, step, self.rank)
            elif a.reward.mode == "oracle_sequence":
                scores = oracle_token_rewards(s.target, prompts, responses, old_logp,
                                              batch.mask).sum(1)
            else:
                scores = self.score(prompts, refs, responses)
            rewards = token_rewards(normalize_groups(scores, a.rollout.samples_per_prompt,
                                                     a.reward.normalize),
                                    batch.mask, old_logp, ref_logp, a.ppo.kl_coef)
        adv, returns = gae(rewards, values, batch.mask, a.ppo.gamma, a.ppo.lam)
        m = batch.mask
        count, adv_sum, adv_sq = self._sum([m.sum(), (adv * m).sum(), (adv ** 2 * m).sum()])
        adv_mean = adv_sum / max(count, 1)
        adv_std = max(adv_sq / max(count, 1) - adv_mean ** 2, 0.0) ** 0.5
        train_adv = whiten(adv, m, adv_mean, adv_std) if a.ppo.whiten_advantages else adv
        t2 = time.time()
        stats = self.update(step, batch, old_logp, train_adv, returns, values)
        t3 = time.time()
        lengths = m.sum(1).double()
        sums = self._sum([scores.sum(), (scores ** 2).sum(), float(n), lengths.sum(),
                          (returns * m).sum(), (values.double() * m).sum(),
                          ((old_logp - ref_logp).double() * m).sum(),
                          (entropy.double() * m).sum()])
        total_n, tokens = sums[2], sums[3]
        reward_mean = sums[0] / total_n
        adv_min, adv_max = self._extremes(adv[m].min().item(), adv[m].max().item())
        row = {
            "reward_mean": reward_mean,
            "reward_std": max(sums[1] / total_n - reward_mean ** 2, 0.0) ** 0.5,
            "advantage_mean": adv_mean, "advantage_std": adv_std,
            "advantage_min": adv_min, "advantage_max": adv_max,
            "return_mean": sums[4] / tokens, "value_mean": sums[5] / tokens,
            **stats,
            "kl_to_init": sums[6] / total_n,  # k1 estimate per sequence, on the rollouts
            "entropy": sums[7] / tokens,
            "response_length": tokens / total_n,
            "lr": self.actor.lr(), "critic_lr": self.critic.lr(),
            "step_rollout_tokens": int(tokens),
        }
        timing = {"rollout_s": t1 - t0, "reward_s": t2 - t1, "ppo_s": t3 - t2,
                  "step_s": t3 - t0, "rollout_tokens_per_s": tokens / max(t1 - t0, 1e-9),
                  "tokens_per_s": tokens / max(t3 - t0, 1e-9)}
        return row, timing

    def score(self, prompts, refs, responses) -> torch.Tensor:
        """Each rollout's mean RM score over its references (rollouts without EOS)."""
        k = len(refs[0])
        cands = [strip_eos(y, self.setup.init.eos_ids) for y in responses]
        flat = self.reward([p for p in prompts for _ in range(k)],
                           [r for rs in refs for r in rs],
                           [c for c in cands for _ in range(k)])
        return flat.view(len(responses), k).mean(1)

    def rollout(self, step: int):
        """This rank's prompts, actor samples and their references (a list of
        ``reward.references`` per rollout) of ``step``; the rollouts collated."""
        a, s = self.args, self.setup
        idx = step_prompts(len(s.train_prompts), step, a.rollout.prompts_per_step, self.rank,
                           self.world, a.seed)
        prompts = [s.train_prompts[i] for i in idx]
        if s.references is not None:
            refs = [[s.references[i]] for i in idx]
        else:
            seed = derive_seed(a.seed, "reference", step, self.rank)
            kr = a.reward.references
            flat = [strip_eos(y, s.target.eos_ids) for y in s.target.generate(
                prompts, kr, seed=seed, max_new_tokens=s.max_new_tokens)]
            refs = [flat[i * kr:(i + 1) * kr] for i in range(len(prompts))]
        k = a.rollout.samples_per_prompt
        self.actor.module.eval()
        responses = self.policy.generate(prompts, k, seed=derive_seed(a.seed, "rollout", step,
                                                                      self.rank))
        rep_prompts = [p for p in prompts for _ in range(k)]
        rep_refs = [r for r in refs for _ in range(k)]
        heads = [s.init.prefix_ids + p for p in rep_prompts]
        return collate_rollouts(heads, responses, s.init.pad_id), rep_prompts, responses, rep_refs

    @torch.no_grad()
    def forward_all(self, batch: RolloutBatch):
        """Rollout-policy log-probs and entropies, reference log-probs and values, [N, T]."""
        dev = self.actor.device
        suppress = self.setup.init.suppress_ids
        out = {k: [] for k in ("logp", "ent", "ref", "val")}
        for lo in range(0, len(batch), self.micro):
            ids = batch.input_ids[lo:lo + self.micro].to(dev)
            att = batch.attention_mask[lo:lo + self.micro].to(dev)
            part = RolloutBatch(ids, att, batch.positions[lo:lo + self.micro].to(dev),
                                batch.tokens[lo:lo + self.micro].to(dev),
                                batch.mask[lo:lo + self.micro].to(dev))
            logits = self.actor.module(input_ids=ids, attention_mask=att, use_cache=False).logits
            logp, ent = token_logprobs(logits, part, suppress)
            ref_logits = self.setup.init.model(input_ids=ids, attention_mask=att,
                                               use_cache=False).logits
            ref, _ = token_logprobs(ref_logits, part, suppress)
            val = gather_positions(self.critic.module(ids, att), part.positions)
            for key, v in (("logp", logp), ("ent", ent), ("ref", ref), ("val", val)):
                out[key].append(v.float().cpu())
        mask = batch.mask
        return tuple(torch.cat(out[k]) * mask for k in ("logp", "ent", "ref", "val"))

    def update(self, step: int, batch: RolloutBatch, old_logp, adv, returns, values) -> dict:
        """``ppo.epochs`` passes over the rollouts in shuffled minibatches; mean stats."""
        a = self.args
        suppress = self.setup.init.suppress_ids
        dev = self.actor.device

        def micro_batch(index):
            b = batch.select(index)
            t = b.tokens.shape[1]
            return {"batch": b.to(dev),
                    "old_logp": old_logp[index, :t].to(dev),
                    "adv": adv[index, :t].float().to(dev),
                    "returns": returns[index, :t].float().to(dev),
                    "old_values": values[index, :t].to(dev)}

        def actor_loss(module, mb):
            b = mb["batch"]
            logits = module(input_ids=b.input_ids, attention_mask=b.attention_mask,
                            use_cache=False).logits
            logp, _ = token_logprobs(logits, b, suppress)
            return policy_loss(logp, mb["old_logp"], mb["adv"], b.mask, a.ppo.clip)

        def critic_loss(module, mb):
            b = mb["batch"]
            v = gather_positions(module(b.input_ids, b.attention_mask), b.positions)
            return value_loss(v, mb["old_values"], mb["returns"], b.mask, a.ppo.value_clip), {}

        totals: dict[str, float] = {}
        updates = 0
        for epoch in range(a.ppo.epochs):
            order = np.random.default_rng([a.seed, 0xA7, step, epoch, self.rank]).permutation(
                len(batch))
            for lo in range(0, len(order), self.minibatch):
                mb_index = order[lo:lo + self.minibatch]
                micros = [micro_batch(torch.as_tensor(mb_index[i:i + self.micro]))
                          for i in range(0, len(mb_index), self.micro)]
                p_loss, p_stats = self.actor.train_step(micros, actor_loss)
                v_loss, _ = self.critic.train_step(micros, critic_loss)
                for k, v in {"policy_loss": p_loss, "value_loss": v_loss, **p_stats}.items():
                    totals[k] = totals.get(k, 0.0) + v
                updates += 1
        keys = sorted(totals)
        means = self._sum([totals[k] / updates for k in keys])
        return {k: v / self.world for k, v in zip(keys, means, strict=True)}

    # ------------------------------------------------------------------------- reductions

    def _sum(self, values) -> list[float]:
        if self.world == 1:
            return [float(v) for v in values]
        import torch.distributed as dist

        # on the engine's device: NCCL reduces only CUDA tensors (gloo takes CPU ones)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                         device=self.actor.device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def _extremes(self, lo: float, hi: float) -> tuple[float, float]:
        if self.world == 1:
            return lo, hi
        import torch.distributed as dist

        t = torch.tensor([-lo, hi], dtype=torch.float64, device=self.actor.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return -t[0].item(), t[1].item()

    # ------------------------------------------------------------------------- evaluation

    def evaluate(self) -> dict:
        """True sequence KL of the actor to the target (and the reverse, and to the initial
        policy) on held-out prompts, full distributions; rank 0 only (others get {})."""
        from polar_scaling.kl import Samples, kl_from_samples

        if self.rank != 0:
            return {}
        s, e = self.setup, self.args.eval
        self.actor.module.eval()
        seed = derive_seed(self.args.seed, "eval")
        mine = Samples(self.eval_policy, s.eval_prompts, e.samples_per_prompt, seed,
                       s.max_new_tokens)
        if self._target_samples is None:
            self._target_samples = Samples(s.target, s.eval_prompts, e.samples_per_prompt,
                                           seed, s.max_new_tokens)
        to_target = kl_from_samples(mine, s.target)
        reverse = kl_from_samples(self._target_samples, self.eval_policy)
        to_init = kl_from_samples(mine, s.init)
        return {"true_kl": to_target.kl_per_sequence,
                "true_kl_stderr": to_target.stderr_per_sequence,
                "true_kl_per_token": to_target.kl_per_token,
                "true_kl_reverse": reverse.kl_per_sequence,
                "true_kl_to_init": to_init.kl_per_sequence,
                "eval_response_length": to_target.mean_length}

    # ------------------------------------------------------------------------- output

    def log_perf(self, timing: dict) -> None:
        if self.rank == 0:
            with open(self.run.path / "perf.jsonl", "a") as f:
                f.write(json.dumps(timing) + "\n")

    def export(self, run) -> None:
        """The trained actor as a causal-LM folder ``RUN/model`` (tokenizer included)."""
        s = self.setup
        state = self.actor.full_state_dict()
        save_causal_lm(self.actor.module, run.model_dir, state)
        if s.tokenizer is not None:
            s.tokenizer.save_pretrained(str(run.model_dir))
        meta = {"stage": "rft", "init": self.args.policy.init, "target": self.args.policy.target,
                "reward": self.args.reward.mode, "prefix_ids": s.init.prefix_ids,
                "eos_ids": s.init.eos_ids, "suppress_ids": s.init.suppress_ids}
        (run.model_dir / "rft.json").write_text(json.dumps(meta, indent=2))


# ------------------------------------------------------------------------------ checkpoints


def save_pair(actor: Engine, critic: Engine, root: Path, step: int, client_state: dict,
              keep: int) -> None:
    """Checkpoint both engines at ``step``, then keep the newest ``keep`` steps both hold."""
    root = Path(root)
    actor.save(root / "actor", step, client_state, keep=0)
    critic.save(root / "critic", step, client_state, keep=0)
    if actor.rank == 0:
        common = sorted(_steps(root / "actor").keys() & _steps(root / "critic").keys())
        for old in common[:-keep]:
            for side in ("actor", "critic"):
                shutil.rmtree(root / side / f"{old:010d}", ignore_errors=True)


def load_pair(actor: Engine, critic: Engine, root: Path) -> dict | None:
    """Restore both engines from the newest step both hold complete and loadable; its client
    state, or None (a damaged step is skipped with a warning)."""
    root = Path(root)
    a, c = _steps(root / "actor"), _steps(root / "critic")
    for step in sorted(a.keys() & c.keys(), reverse=True):
        try:
            loaded, _ = actor.ds.load_checkpoint(str(a[step].parent), tag=a[step].name,
                                                 load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
            _, state = critic.ds.load_checkpoint(str(c[step].parent), tag=c[step].name,
                                                 load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
        except Exception as e:  # a damaged checkpoint: fall back to an older one
            warnings.warn(f"skipping damaged checkpoint step {step} in {root}: "
                          f"{type(e).__name__}: {e}", stacklevel=2)
            continue
        if loaded is None or state is None:
            warnings.warn(f"skipping damaged checkpoint step {step} in {root}: nothing loaded",
                          stacklevel=2)
            continue
        return state
    return None


def _steps(root: Path) -> dict[int, Path]:
    return {int(p.name): p for p in complete_checkpoints(root)}


def summarize(run, total: int, tokens: int, wall: float, timings: list[dict], world: int,
              rank: int) -> dict:
    """The run summary for ``done.json``: budget, timings, and the true-KL fall."""
    summary = {"stage": "rft", "steps": total, "rollout_tokens": tokens,
               "wall_seconds_last_session": round(wall, 2), "world_size": world}
    if timings:
        for key in ("step_s", "rollout_s", "ppo_s"):
            summary[f"mean_{key}"] = round(float(np.mean([t[key] for t in timings])), 4)
        rollout_time = sum(t["rollout_s"] for t in timings)
        step_time = sum(t["step_s"] for t in timings)
        done_tokens = sum(t["rollout_tokens_per_s"] * t["rollout_s"] for t in timings)
        summary["rollout_tokens_per_s"] = round(done_tokens / max(rollout_time, 1e-9), 1)
        summary["tokens_per_s"] = round(done_tokens / max(step_time, 1e-9), 1)
    rows = run.read_metrics() if rank == 0 else []
    evals = [r for r in rows if "true_kl" in r]
    train = [r for r in rows if "reward_mean" in r]
    if train:
        summary["final_reward_mean"] = train[-1]["reward_mean"]
    if evals:
        summary["final_eval"] = evals[-1]
        if evals[0]["step"] == 0:
            first, last = evals[0]["true_kl"], evals[-1]["true_kl"]
            summary.update({"initial_true_kl": first, "final_true_kl": last,
                            "true_kl_fall": 1.0 - last / first if first else float("nan")})
    return summary
