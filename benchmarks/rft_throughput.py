"""RFT throughput: the ``rft`` stage's PPO step against a plain loop of the same cycle.

Both paths run in one process on the same world, prompts, reward model and PPO settings:

- stage: :class:`polar_scaling.rft_loop.PPOStep` (actor and critic on DeepSpeed engines,
  rollouts through the policy API, metrics reduced as in a run);
- plain: the same generate → score → update cycle written directly: ``model.generate`` on
  a left-padded batch, the reward model's forward, GAE, and ``torch.optim.AdamW`` updates
  with gradient clipping, no engine, no reductions.

Steps alternate in blocks (stage, plain, stage, plain ...) so that load from other processes
falls on both; reported are medians over the timed steps: rollout tokens/s (the actor's
response tokens over the rollout phase, which also writes the references), the whole step's
seconds and the update phase's seconds, and stage/plain ratios (above 1: the stage is slower).

By default a small synthetic world is generated into a temporary folder and the reward
model is a randomly initialised one of ``--rm-size`` (scoring costs what a trained one does);
``--data`` and ``--rm`` take existing ones. ``--policy-size`` replaces the world's tiny
policies by randomly initialised causal LMs of a ladder size (initial and target policy,
local folders, the world's tokenizer), ``--max-new-tokens`` and ``--fixed-length`` set the
rollout length: what a GPU needs to be measured at all.

On CUDA both paths run there: the stage in its engine's precision (bf16), the plain loop
with fp32 weights under bf16 autocast and fused AdamW. With ``--policy-size`` and
``--fixed-length`` (so that both paths' sequences are equally long) the update phase's model
FLOP/s (6N per token and pass for actor and critic, ``ppo.epochs`` passes) and, on a known
card, its MFU are reported too. What the stage does beyond the plain loop counts against it:
the reference policy's forward pass (for ``kl_to_init`` and the KL penalty, run even at
``kl_coef=0``), entropies, metrics reduced over ranks, and its static-cache ``generate``
(the plain loop's ``generate`` uses transformers' default cache).

    python benchmarks/rft_throughput.py
    python benchmarks/rft_throughput.py --data runs/rftx/data --rm runs/rftx/rm_strong/model
    python benchmarks/rft_throughput.py --policy-size 100M --rm-size 100M \
        --max-new-tokens 128 --fixed-length --prompts-per-step 64 --samples-per-prompt 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from polar_scaling.config import load_config  # noqa: E402
from polar_scaling.dist_env import init_distributed  # noqa: E402
from polar_scaling.gpu import device_name, mfu, peak_flops  # noqa: E402
from polar_scaling.rft import RFTArgs  # noqa: E402
from polar_scaling.rft_loop import PPOStep  # noqa: E402
from polar_scaling.rft_ppo import (  # noqa: E402
    ValueModel,
    collate_rollouts,
    gae,
    gather_positions,
    policy_loss,
    token_logprobs,
    token_rewards,
    value_loss,
    whiten,
)
from polar_scaling.rft_rollout import step_prompts, strip_eos, trainable_copy  # noqa: E402
from polar_scaling.rundir import RunDir  # noqa: E402
from polar_scaling.world import derive_seed  # noqa: E402

WORLD = {
    "world": {"content_vocab": 32, "families": 2, "members_per_family": 2,
              "heldout_members_per_family": 1, "logit_scale": 1.5,
              "arch": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                       "num_heads": 2, "max_positions": 64}},
    "prompts": {"train": 256, "heldout_prompts": 16, "heldout_policies": 16,
                "min_len": 2, "max_len": 6},
    "sampling": {"max_new_tokens": 12, "batch_size": 512},
    "kl": {"enabled": False}, "workers": 1, "progress": False,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="a synthetic-world dataset (default: a small one in a temp dir)")
    p.add_argument("--rm", help="a reward-model folder (default: a random one of --rm-size)")
    p.add_argument("--rm-size", default="t25k")
    p.add_argument("--steps", type=int, default=6, help="timed steps per path per block")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--prompts-per-step", type=int, default=32)
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--minibatch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--policy-size", help="ladder size of random initial/target policies "
                   "(default: the world's own policies)")
    p.add_argument("--max-new-tokens", type=int, help="rollout length cap (default: the data's)")
    p.add_argument("--fixed-length", action="store_true",
                   help="no EOS: every rollout is --max-new-tokens long")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def make_inputs(tmp: Path, args) -> tuple[str, str, tuple[str, str]]:
    data, rm = args.data, args.rm
    if data is None:
        from polar_scaling.data_generate import GenerateArgs, generate

        data = str(tmp / "data")
        generate(load_config(GenerateArgs, None, [], defaults=WORLD), Path(data))
    if rm is None:
        from polar_scaling.model import RewardModel
        from polar_scaling.sizes import get_size, hf_config
        from polar_scaling.tokenizer import load_tokenizer

        tok = load_tokenizer(Path(data) / "tokenizer")
        torch.manual_seed(0)
        cfg = hf_config(get_size(args.rm_size).with_vocab(len(tok)), pad_token_id=tok.pad_token_id)
        rm = str(tmp / "rm")
        RewardModel.from_config(cfg, {"wrapper": "pretrain"}).save_pretrained(rm)
        tok.save_pretrained(rm)
    policies = ("f0m0", "f1m0")
    if args.policy_size:
        policies = tuple(str(policy_folder(tmp / f"policy{seed}", data, args.policy_size, seed))
                         for seed in (0, 1))
    return data, rm, policies


def policy_folder(path: Path, data: str, size: str, seed: int) -> Path:
    """A randomly initialised causal LM of a ladder size with the world's tokenizer."""
    from transformers import AutoModelForCausalLM

    from polar_scaling.sizes import get_size, hf_config
    from polar_scaling.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(data) / "tokenizer")
    cfg = hf_config(get_size(size).with_vocab(len(tok)), pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(str(path))
    return path


def update_flops(size: str, vocab: int, seq_lens, epochs: int) -> float:
    """Model FLOPs of the update phase: ``epochs`` training passes of actor (LM head) and
    critic (value head) over the rollout sequences."""
    from polar_scaling.sizes import get_size, train_flops

    s = get_size(size).with_vocab(vocab)
    return epochs * (train_flops(s, seq_lens, head="lm") + train_flops(s, seq_lens))


class PlainLoop:
    """The generate → score → PPO-update cycle without the stage's machinery: on the stage's
    device, fp32 weights (under bf16 autocast on CUDA), ``torch.optim.AdamW``."""

    def __init__(self, stage: PPOStep):
        a = stage.args
        self.a, self.setup, self.reward = a, stage.setup, stage.reward
        self.device = stage.actor.device
        cuda = self.device.type == "cuda"
        # The stage has cast the frozen initial policy to its own dtype: copy it back to fp32.
        self.actor = trainable_copy(self.setup.init).float().to(self.device)
        self.critic = ValueModel.from_policy(self.setup.init.model).float().to(self.device)
        opt = {"betas": (a.optim.beta1, a.optim.beta2), "eps": a.optim.eps, "weight_decay": 0.0,
               **({"fused": True} if cuda else {})}
        self.opt_actor = torch.optim.AdamW(self.actor.parameters(), lr=a.optim.lr, **opt)
        self.opt_critic = torch.optim.AdamW(self.critic.parameters(), lr=a.critic_optim.lr, **opt)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
        from transformers import GenerationConfig

        init, r = self.setup.init, a.rollout
        self.gen = GenerationConfig(
            do_sample=True, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
            max_new_tokens=self.setup.max_new_tokens, min_new_tokens=0, pad_token_id=init.pad_id,
            eos_token_id=init.eos_ids, suppress_tokens=init.suppress_ids or None)

    def _generate(self, heads: list[list[int]], seed: int) -> list[list[int]]:
        width = max(map(len, heads))
        ids = torch.full((len(heads), width), self.setup.init.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, h in enumerate(heads):
            ids[i, width - len(h):], mask[i, width - len(h):] = torch.tensor(h), 1
        torch.manual_seed(seed)
        self.actor.eval()
        with torch.no_grad(), self.autocast:
            new = self.actor.generate(input_ids=ids.to(self.device),
                                      attention_mask=mask.to(self.device),
                                      generation_config=self.gen)[:, width:].tolist()
        self.actor.train()
        eos = set(self.setup.init.eos_ids)
        out = []
        for row in new:
            end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            out.append(row[:end])
        return out

    def step(self, step: int) -> dict:
        a, s = self.a, self.setup
        t0 = time.time()
        idx = step_prompts(len(s.train_prompts), step, a.rollout.prompts_per_step, 0, 1, a.seed)
        prompts = [s.train_prompts[i] for i in idx]
        refs = [strip_eos(y, s.target.eos_ids) for y in s.target.generate(
            prompts, 1, seed=derive_seed(a.seed, "reference", step, 0),
            max_new_tokens=s.max_new_tokens)]
        k = a.rollout.samples_per_prompt
        rep_p = [p for p in prompts for _ in range(k)]
        rep_r = [r for r in refs for _ in range(k)]
        heads = [s.init.prefix_ids + p for p in rep_p]
        responses = self._generate(heads, derive_seed(a.seed, "plain", step))
        t1 = time.time()
        batch = collate_rollouts(heads, responses, s.init.pad_id).to(self.device)
        scores = self.reward(rep_p, rep_r, [strip_eos(y, s.init.eos_ids) for y in responses])
        with torch.no_grad(), self.autocast:
            logp, _ = token_logprobs(self.actor(input_ids=batch.input_ids,
                                                attention_mask=batch.attention_mask).logits,
                                     batch, s.init.suppress_ids)
            values = gather_positions(self.critic(batch.input_ids, batch.attention_mask),
                                      batch.positions).float() * batch.mask
        m = batch.mask.cpu()  # rewards and GAE on the CPU, as in the stage
        adv, ret = gae(token_rewards(scores, m), values.cpu(), m)
        mean = adv[m].mean().item()
        adv = whiten(adv, m, mean, adv[m].std(unbiased=False).item()).float().to(self.device)
        ret = ret.float().to(self.device)
        t2 = time.time()
        for epoch in range(a.ppo.epochs):
            order = np.random.default_rng([a.seed, step, epoch]).permutation(len(batch))
            for lo in range(0, len(order), a.ppo.minibatch):
                index = torch.as_tensor(order[lo:lo + a.ppo.minibatch], device=self.device)
                b = batch.select(index)
                t = b.tokens.shape[1]
                with self.autocast:
                    lp, _ = token_logprobs(self.actor(input_ids=b.input_ids,
                                                      attention_mask=b.attention_mask).logits,
                                           b, s.init.suppress_ids)
                    loss, _ = policy_loss(lp, logp[index, :t], adv[index, :t], b.mask,
                                          a.ppo.clip)
                self._update(self.opt_actor, self.actor, loss)
                with self.autocast:
                    v = gather_positions(self.critic(b.input_ids, b.attention_mask), b.positions)
                    vloss = value_loss(v.float(), values[index, :t], ret[index, :t], b.mask,
                                       a.ppo.value_clip)
                self._update(self.opt_critic, self.critic, vloss)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t3 = time.time()
        tokens = int(m.sum())
        return {"rollout_s": t1 - t0, "ppo_s": t3 - t2, "step_s": t3 - t0,
                "rollout_tokens_per_s": tokens / (t1 - t0), "response_length": tokens / len(responses),
                "seq_lens": [len(h) + len(r) for h, r in zip(heads, responses, strict=True)]}

    def _update(self, opt, model, loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.a.optim.grad_clip)
        opt.step()


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    init_distributed()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, rm, (init, target) = make_inputs(tmp, args)
        extra = [f"rollout.max_new_tokens={args.max_new_tokens}"] if args.max_new_tokens else []
        if args.fixed_length:
            extra.append("policy.allow_eos=false")
        cfg = load_config(RFTArgs, None, [
            f"data.dir={data}", f"reward.model={rm}", "reward.mode=rm", f"policy.init={init}",
            f"policy.target={target}", f"rollout.prompts_per_step={args.prompts_per_step}",
            f"rollout.samples_per_prompt={args.samples_per_prompt}",
            f"ppo.minibatch={args.minibatch}", f"ppo.epochs={args.epochs}",
            f"budget.steps={10 ** 6}", "schedule.progress=false", *extra])
        run = RunDir(tmp / "run")
        run.path.mkdir()
        stage = PPOStep(cfg, run, 0, 1)
        plain = PlainLoop(stage)
        stage.step(0), plain.step(0)  # warm-up: first generate call, allocator
        times = {"stage": [], "plain": []}
        step = 1
        for _ in range(args.blocks):
            for name in ("stage", "plain"):
                for i in range(args.steps):
                    if name == "stage":
                        row, t = stage.step(step + i)
                        t["response_length"] = row["response_length"]
                    else:
                        t = plain.step(step + i)
                    times[name].append(t)
            step += args.steps
        device = stage.actor.device
        precision = str(next(stage.actor.module.parameters()).dtype).replace("torch.", "")
        vocab = stage.setup.init.model.config.vocab_size
    med = {name: {k: statistics.median(t[k] for t in rows)
                  for k in ("rollout_s", "ppo_s", "step_s", "rollout_tokens_per_s",
                            "response_length")}
           for name, rows in times.items()}
    out = {
        "device": device_name(device), "stage_precision": precision,
        "plain_precision": "fp32 weights, bf16 autocast" if device.type == "cuda" else "fp32",
        "policy_size": args.policy_size or "world", "rm_size": args.rm or args.rm_size,
        "rollouts_per_step": args.prompts_per_step * args.samples_per_prompt,
        "ppo_epochs": args.epochs, "minibatch": args.minibatch, "threads": args.threads,
        "timed_steps_per_path": args.steps * args.blocks,
        "stage": med["stage"], "plain": med["plain"],
        "step_time_ratio": med["stage"]["step_s"] / med["plain"]["step_s"],
        "ppo_time_ratio": med["stage"]["ppo_s"] / med["plain"]["ppo_s"],
        "rollout_time_ratio": med["stage"]["rollout_s"] / med["plain"]["rollout_s"],
    }
    if args.policy_size and args.fixed_length:
        # Fixed length: both paths' sequences are as long as the plain loop's (same prompts).
        flops = statistics.median(update_flops(args.policy_size, vocab, t["seq_lens"],
                                               args.epochs) for t in times["plain"])
        peak = peak_flops(device_name(device))  # None on a CPU
        for name in ("stage", "plain"):
            rate = flops / med[name]["ppo_s"]
            out[name]["update_model_tflops_per_s"] = rate / 1e12
            out[name]["update_mfu"] = mfu(rate, peak)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
