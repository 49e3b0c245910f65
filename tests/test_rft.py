"""RFT (PPO with a POLAR reward): the PPO arithmetic, the batch layout against the policies'
exact log-probabilities, the stage end to end on the real DeepSpeed engines, exact resume
after SIGKILL, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from polar_scaling.cli import run_stage
from polar_scaling.config import ConfigError
from polar_scaling.errors import StageError
from polar_scaling.rft_ppo import (
    collate_rollouts,
    gae,
    normalize_groups,
    policy_loss,
    token_logprobs,
    token_rewards,
    value_loss,
)
from polar_scaling.rft_rollout import step_prompts
from polar_scaling.rundir import read_jsonl

JOB = Path(__file__).parent / "jobs" / "rft_job.py"
SMALL = ["rollout.prompts_per_step=8", "rollout.samples_per_prompt=2", "ppo.minibatch=8",
         "eval.prompts=4", "eval.samples_per_prompt=2", "schedule.progress=false"]


# ------------------------------------------------------------------------------ PPO maths


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    rewards = torch.randn(3, 4, generator=g) * mask
    values = torch.randn(3, 4, generator=g) * mask
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    to_go = rewards.double().flip(1).cumsum(1).flip(1)
    assert torch.allclose(adv, (to_go - values.double()) * mask)
    assert torch.allclose(ret, to_go * mask)


def test_gae_matches_the_recursion_for_gamma_lambda_below_one():
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    rewards, values = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i in range(2):
        n = int(mask[i].sum())
        running = 0.0
        for t in reversed(range(n)):
            nxt = values[i, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[i, t].item() + gamma * nxt - values[i, t].item()
            running = delta + gamma * lam * running
            assert adv[i, t].item() == pytest.approx(running, abs=1e-9)
            assert ret[i, t].item() == pytest.approx(running + values[i, t].item(), abs=1e-9)
        assert (adv[i, n:] == 0).all()


def test_token_rewards_put_the_score_on_the_last_token_and_the_kl_penalty_everywhere():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    scores = torch.tensor([2.0, -1.0])
    assert token_rewards(scores, mask).tolist() == [[0, 0, 2.0], [-1.0, 0, 0]]
    logp = torch.tensor([[-1.0, -2.0, -1.0], [-0.5, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-1.5, 0.0, 0.0]])
    r = token_rewards(scores, mask, logp, ref, kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[-0.05, 0.1, 2.0], [-1.1, 0, 0]], dtype=torch.float64))


def test_policy_loss_clips_the_ratio_in_the_direction_of_the_advantage():
    mask = torch.ones(1, 4, dtype=torch.bool)
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 1.05]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip=0.2)
    # token 0: ratio 1.5 > 1.2 with A > 0 -> clipped (no gradient); token 1: A < 0 keeps the
    # unclipped (larger) loss; token 2: ratio 0.5 < 0.8 with A < 0 -> clipped; token 3 inside.
    assert loss.item() == pytest.approx((-1.2 + 1.5 + 0.8 - 1.05) / 4, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(0.5)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 2] == 0
    assert logp.grad[0, 1] == pytest.approx(1.5 / 4) and logp.grad[0, 3] == pytest.approx(-1.05 / 4)


def test_value_loss_takes_the_larger_of_plain_and_clipped_error():
    mask = torch.ones(1, 2, dtype=torch.bool)
    old = torch.tensor([[0.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0]])
    values = torch.tensor([[0.9, 0.1]])
    # token 0 moved 0.9 (clipped to 0.2: error 0.64 > 0.01); token 1 stays inside the clip.
    assert value_loss(values, old, ret, mask, 0.2).item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert value_loss(values, old, ret, mask, None).item() == pytest.approx(0.5 * (0.01 + 0.81) / 2)


def test_group_normalisation_centres_and_whitens_each_prompts_rollouts():
    scores = torch.tensor([1.0, 3.0, 2.0, 10.0, 10.0, 10.0, -1.0, 0.0, 4.0])
    assert torch.equal(normalize_groups(scores, 3, "none"), scores)
    centred = normalize_groups(scores, 3, "group").view(3, 3)
    assert torch.allclose(centred.sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert centred[0].tolist() == pytest.approx([-1.0, 1.0, 0.0])
    white = normalize_groups(scores, 3, "group_whiten").view(3, 3)
    assert white[0].std(unbiased=False).item() == pytest.approx(1.0)
    assert white[2].std(unbiased=False).item() == pytest.approx(1.0)
    assert white[1].tolist() == [0.0, 0.0, 0.0]  # equal scores: no signal, not NaN
    assert white[2].tolist() == pytest.approx((centred[2] / centred[2].std(unbiased=False)).tolist())


def test_batch_layout_gives_the_policys_exact_log_probabilities(tiny_dataset):
    from polar_scaling.rft_rollout import load_setup

    s = load_setup(str(tiny_dataset), None, "f0m0", "f1m0", 4, None)
    prompts = s.train_prompts[:6]
    responses = s.init.generate(prompts, num_samples=1, seed=3, full_distribution=True)
    batch = collate_rollouts([s.init.prefix_ids + p for p in prompts], responses,
                             s.init.pad_id)
    with torch.no_grad():
        logits = s.init.model(input_ids=batch.input_ids,
                              attention_mask=batch.attention_mask).logits
    logp, entropy = token_logprobs(logits, batch, s.init.suppress_ids)
    exact = s.init.logprobs(prompts, responses)
    for i, row in enumerate(exact):
        assert logp[i, :len(row)].double().numpy() == pytest.approx(row, abs=1e-5)
        assert (logp[i, len(row):] == 0).all() and (entropy[i] >= 0).all()
    part = batch.select([4, 1])
    assert part.tokens.tolist()[0][:len(responses[4])] == responses[4]


def test_step_prompts_cover_every_prompt_once_per_pass_and_split_ranks():
    n, per_step = 10, 4
    seen = [i for s in range(5) for i in step_prompts(n, s, per_step, 0, 1, seed=0)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    both = step_prompts(n, 3, per_step, 0, 2, 0) + step_prompts(n, 3, per_step, 1, 2, 0)
    assert both == step_prompts(n, 3, per_step, 0, 1, 0)
    assert step_prompts(n, 3, per_step, 0, 1, 0) != step_prompts(n, 3, per_step, 0, 1, 1)


# ------------------------------------------------------------------------------ fixtures


def save_reward_model(path: Path, tokenizer, size: str = "t12k", seed: int = 0) -> Path:
    from polar_scaling.model import RewardModel
    from polar_scaling.sizes import get_size, hf_config

    torch.manual_seed(seed)
    cfg = hf_config(get_size(size).with_vocab(len(tokenizer)),
                    pad_token_id=tokenizer.pad_token_id)
    model = RewardModel.from_config(cfg, meta={"reward_token_id": 4, "wrapper": "pretrain"})
    model.save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def rm_dir(tiny_dataset, tmp_path_factory):
    from polar_scaling.tokenizer import load_tokenizer

    return save_reward_model(tmp_path_factory.mktemp("rm") / "rm",
                             load_tokenizer(tiny_dataset / "tokenizer"))


# ------------------------------------------------------------------------------ the stage


def test_stage_end_to_end_writes_metrics_evals_checkpoints_and_model(tiny_dataset, rm_dir,
                                                                     tmp_path, one_thread):
    run = tmp_path / "rft"
    overrides = [f"data.dir={tiny_dataset}", f"reward.model={rm_dir}", "reward.mode=rm",
                 "budget.steps=5", "schedule.checkpoint_every=2", "schedule.eval_points=3",
                 *SMALL]
    summary = run_stage("rft", None, overrides, run)
    rows = read_jsonl(run / "metrics.jsonl")
    train = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "true_kl" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    for key in ("reward_std", "advantage_mean", "advantage_std", "advantage_min",
                "advantage_max", "policy_loss", "value_loss", "clip_frac", "ppo_approx_kl",
                "kl_to_init", "response_length", "entropy", "lr", "critic_lr"):
        assert all(key in r for r in train), key
    assert train[0]["kl_to_init"] == pytest.approx(0.0, abs=1e-6)  # nothing updated yet
    assert 1 <= train[0]["response_length"] <= 6  # the dataset's max_new_tokens
    assert evals[0]["step"] == 0 and evals[0]["true_kl_to_init"] == 0.0
    assert evals[0]["true_kl"] > 1.0  # another family than the target
    assert evals[-1]["step"] == 5 and evals[-1]["true_kl_to_init"] > 0
    assert [r["rollout_tokens"] for r in train] == sorted(r["rollout_tokens"] for r in train)
    assert summary["rollout_tokens"] == train[-1]["rollout_tokens"]
    assert summary["initial_true_kl"] == evals[0]["true_kl"]
    perf = read_jsonl(run / "perf.jsonl")
    assert len(perf) == 5 and all(p["rollout_tokens_per_s"] > 0 for p in perf)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in (ckpts / "actor").iterdir()) == ["0000000004", "0000000005"]
    assert sorted(p.name for p in (ckpts / "critic").iterdir()) == ["0000000004", "0000000005"]
    from transformers import AutoModelForCausalLM

    actor = AutoModelForCausalLM.from_pretrained(run / "model")
    assert json.loads((run / "model" / "rft.json").read_text())["target"] == "f1m0"
    from polar_scaling.rft_rollout import load_setup

    init = load_setup(str(tiny_dataset), None, "f0m0", None, 1, None).init.model
    moved = sum((a - b).abs().sum().item() for a, b in
                zip(actor.parameters(), init.parameters(), strict=True))
    assert moved > 0
    # a finished run is not trained again
    assert run_stage("rft", None, overrides, run) == json.loads((run / "done.json").read_text())


def test_bf16_run_puts_the_reference_and_reward_model_in_the_actors_dtype(
        tiny_dataset, rm_dir, tmp_path, one_thread):
    # As on a GPU: DeepSpeed casts the actor to bf16; the frozen initial policy (the KL
    # reference) and the RM follow it, so the untouched actor's log-ratio to the reference
    # is exactly 0 at the first step. The target stays fp32 (the true KL's yardstick).
    from polar_scaling.config import load_config
    from polar_scaling.dist_env import init_distributed
    from polar_scaling.rft import RFTArgs
    from polar_scaling.rft_loop import PPOStep
    from polar_scaling.rundir import RunDir

    args = load_config(RFTArgs, None, [
        f"data.dir={tiny_dataset}", f"reward.model={rm_dir}", "reward.mode=rm",
        "engine.precision=bf16", "ppo.kl_coef=0.1", "budget.steps=2", *SMALL])
    init_distributed()
    run = RunDir(tmp_path / "bf16")
    run.path.mkdir()
    ppo = PPOStep(args, run, 0, 1)
    dtype = lambda m: next(m.parameters()).dtype  # noqa: E731
    assert dtype(ppo.actor.module) == torch.bfloat16
    assert dtype(ppo.setup.init.model) == torch.bfloat16
    assert dtype(ppo.reward.model) == torch.bfloat16
    assert ppo.reward.model.score.weight.dtype == torch.float32  # scores keep their digits
    assert dtype(ppo.setup.target.model) == torch.float32
    row, _ = ppo.step(0)
    assert row["kl_to_init"] == 0.0
    assert torch.isfinite(torch.tensor([row["policy_loss"], row["value_loss"]])).all()
    row, _ = ppo.step(1)
    assert row["kl_to_init"] != 0.0  # the actor moved; the reference did not
    # The export holds DeepSpeed's fp32 master weights and says so: it reloads in fp32.
    from transformers import AutoModelForCausalLM

    ppo.export(run)
    exported = AutoModelForCausalLM.from_pretrained(run.model_dir)
    assert dtype(exported) == torch.float32
    master = ppo.actor.full_state_dict()
    assert all(torch.equal(v, master[k]) for k, v in exported.state_dict().items())


def test_two_ranks_split_the_rollouts_and_reduce_the_metrics(tiny_dataset, rm_dir, tmp_path):
    # torchrun with 2 CPU ranks (gloo): each rank rolls out half of a step's prompts; the
    # metrics rank 0 writes are sums over both ranks (so a step's token count is the mean
    # response length times all of the step's rollouts).
    from polar_scaling.dist_env import free_port

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    run = tmp_path / "rft2"
    proc = subprocess.run([
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", "-m", "polar_scaling.cli", "rft",
        f"data.dir={tiny_dataset}", f"reward.model={rm_dir}", "reward.mode=rm",
        "budget.steps=3", "schedule.eval_points=1", *SMALL, "--run-dir", str(run)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    done = json.loads((run / "done.json").read_text())
    assert done["world_size"] == 2
    train = [r for r in read_jsonl(run / "metrics.jsonl") if "reward_mean" in r]
    assert [r["step"] for r in train] == [1, 2, 3]  # one row per step: rank 0 writes
    tokens = [0] + [r["rollout_tokens"] for r in train]
    for r, before, after in zip(train, tokens[:-1], tokens[1:], strict=True):
        assert after - before == pytest.approx(r["response_length"] * 8 * 2)  # 8 prompts x 2


def test_oracle_reward_pulls_the_policy_toward_the_target(tiny_dataset, tmp_path, one_thread):
    # The PPO machinery itself: with the exact per-token reward log target - log π, the true
    # KL to the target must fall within a dozen steps (the RM can only approximate this).
    run = tmp_path / "oracle"
    summary = run_stage("rft", None, [
        f"data.dir={tiny_dataset}", "reward.mode=oracle", "budget.steps=12",
        "rollout.prompts_per_step=16", "rollout.samples_per_prompt=2", "ppo.minibatch=16",
        "optim.lr=1e-2", "eval.prompts=6", "eval.samples_per_prompt=4",
        "schedule.eval_points=2", "schedule.checkpoint_every=100", "schedule.progress=false"],
        run)
    assert summary["true_kl_fall"] > 0.35, summary


def test_random_reward_moves_the_policy_but_not_toward_the_target(tiny_dataset, tmp_path,
                                                                  one_thread):
    run = tmp_path / "random"
    summary = run_stage("rft", None, [
        f"data.dir={tiny_dataset}", "reward.mode=random", "budget.steps=12",
        "rollout.prompts_per_step=16", "rollout.samples_per_prompt=2", "ppo.minibatch=16",
        "optim.lr=1e-2", "eval.prompts=6", "eval.samples_per_prompt=4",
        "schedule.eval_points=2", "schedule.checkpoint_every=100", "schedule.progress=false"],
        run)
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "reward_mean" in r]
    assert all(0.5 < r["reward_std"] < 1.5 for r in rows)  # N(0, 1) scores
    assert summary["final_eval"]["true_kl_to_init"] > 0.1  # it does move...
    assert summary["true_kl_fall"] < 0.15, summary  # ...but not to the target


def test_fixed_length_run_suppresses_eos_for_every_policy_and_averages_references(
        tiny_dataset, rm_dir, tmp_path, one_thread):
    # policy.allow_eos=false: rollouts, references and the true-KL samples all run to the
    # cap (the tiny world's policies otherwise stop early), so length cannot move the KL.
    from polar_scaling.config import load_config
    from polar_scaling.rft import RFTArgs
    from polar_scaling.rft_loop import PPOStep
    from polar_scaling.rft_rollout import load_setup
    from polar_scaling.rundir import RunDir

    free = load_setup(str(tiny_dataset), None, "f0m0", "f1m0", 4, None)
    lengths = [len(y) for y in free.init.generate(free.train_prompts[:64], 1, seed=0)]
    assert min(lengths) < free.max_new_tokens  # the check below can fail
    overrides = [f"data.dir={tiny_dataset}", f"reward.model={rm_dir}", "reward.mode=rm",
                 "policy.allow_eos=false", "reward.references=3",
                 "reward.normalize=group_whiten", "budget.steps=3", "schedule.eval_points=2",
                 "schedule.checkpoint_every=100", *SMALL]
    run = tmp_path / "fixed"
    run_stage("rft", None, overrides, run)
    rows = read_jsonl(run / "metrics.jsonl")
    cap = free.max_new_tokens
    assert all(r["response_length"] == cap for r in rows if "reward_mean" in r)
    evals = [r for r in rows if "true_kl" in r]
    assert all(r["eval_response_length"] == cap for r in evals)
    assert evals[0]["true_kl_per_token"] == pytest.approx(evals[0]["true_kl"] / cap)

    args = load_config(RFTArgs, None, overrides)
    (tmp_path / "probe").mkdir()
    ppo = PPOStep(args, RunDir(tmp_path / "probe"), 0, 1)
    eos = ppo.setup.init.eos_ids
    _, prompts, responses, refs = ppo.rollout(0)
    assert all(len(rs) == 3 for rs in refs) and all(len(y) == cap for y in responses)
    assert all(len(r) == cap and not set(r) & set(eos) for rs in refs for r in rs)
    assert refs[0] != [refs[0][0]] * 3  # three different target samples
    one_by_one = torch.stack([ppo.reward(prompts, [rs[j] for rs in refs], responses)
                              for j in range(3)]).mean(0)
    assert torch.allclose(ppo.score(prompts, refs, responses), one_by_one, atol=1e-9)
    logp, _ = ppo.setup.target.log_distributions(prompts[:4], responses[:4])
    assert torch.isinf(logp[..., eos]).all()  # EOS has probability 0 under the target too


# ------------------------------------------------------------------------------ resume


def _launch(run_dir, sleep, overrides):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([sys.executable, str(JOB), str(run_dir), str(sleep), *overrides],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("options", [
    [], ["policy.allow_eos=false", "reward.references=2", "reward.normalize=group"]],
    ids=["default", "fixed_length_references_group"])
def test_resume_after_sigkill_is_exact(tiny_dataset, rm_dir, tmp_path, one_thread, options):
    overrides = [f"data.dir={tiny_dataset}", f"reward.model={rm_dir}", "reward.mode=rm",
                 "budget.steps=6", "schedule.checkpoint_every=2", "schedule.eval_points=3",
                 "ppo.micro=4", *SMALL, *options]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    killed = _launch(cut, 0.5, overrides)
    run_stage("rft", None, overrides, ref)  # the uninterrupted run, meanwhile, in-process
    marker = cut / "checkpoints" / "critic" / "0000000002" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists():
        assert killed.poll() is None, killed.communicate()[0]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (cut / "done.json").exists()
    assert len(read_jsonl(cut / "metrics.jsonl")) < len(read_jsonl(ref / "metrics.jsonl"))
    run_stage("rft", None, overrides, cut)  # the resume, in-process like the reference
    a, b = read_jsonl(ref / "metrics.jsonl"), read_jsonl(cut / "metrics.jsonl")
    assert len(a) == len(b) and sum("true_kl" in r for r in a) >= 3
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=1e-6, rel=0), k
    from safetensors.torch import load_file

    wa = load_file(str(ref / "model" / "model.safetensors"))
    wb = load_file(str(cut / "model" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


# ------------------------------------------------------------------------------ bad input


def test_prompt_file_without_references_is_a_clear_error(tiny_dataset, rm_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "ĀāĂ", "reference": "ăĄ"}) + "\n"
                       + json.dumps({"prompt": "Āā"}) + "\n")
    with pytest.raises(StageError, match=r"prompts.jsonl:2: no 'reference'"):
        run_stage("rft", None, [f"data.dir={tiny_dataset}", f"data.prompts={prompts}",
                                "policy.target=null", f"reward.model={rm_dir}",
                                "reward.mode=rm"], tmp_path / "run")


def test_a_language_model_folder_is_not_a_reward_model(tiny_dataset, tmp_path):
    from polar_scaling.rft_rollout import load_setup

    s = load_setup(str(tiny_dataset), None, "f0m0", None, 1, None)
    s.init.model.save_pretrained(tmp_path / "lm")
    s.tokenizer.save_pretrained(str(tmp_path / "lm"))
    with pytest.raises(StageError, match=r"reward.model .*lm is not a reward model.*score"):
        run_stage("rft", None, [f"data.dir={tiny_dataset}", f"reward.model={tmp_path / 'lm'}",
                                "reward.mode=rm"], tmp_path / "run")


def test_a_reward_model_with_another_tokenizer_is_refused(tiny_dataset, tmp_path):
    from polar_scaling.tokenizer import build_world_tokenizer

    other = save_reward_model(tmp_path / "rm20", build_world_tokenizer(20))
    with pytest.raises(StageError, match="must share one tokenizer"):
        run_stage("rft", None, [f"data.dir={tiny_dataset}", f"reward.model={other}",
                                "reward.mode=rm"], tmp_path / "run")


def test_local_policy_folder_with_another_tokenizer_is_refused(tiny_dataset, rm_dir, tmp_path):
    from polar_scaling.rft_rollout import load_setup
    from polar_scaling.tokenizer import build_world_tokenizer

    s = load_setup(str(tiny_dataset), None, "f0m0", None, 1, None)
    s.init.model.save_pretrained(tmp_path / "pol")
    build_world_tokenizer(20).save_pretrained(str(tmp_path / "pol"))
    with pytest.raises(StageError, match="policy.init .* differs from the dataset's"):
        run_stage("rft", None, [f"data.dir={tiny_dataset}", f"policy.init={tmp_path / 'pol'}",
                                f"reward.model={rm_dir}", "reward.mode=rm"], tmp_path / "run")


@pytest.mark.parametrize("override,key", [
    (["reward.mode=rm"], "reward.model"),
    (["rollout.prompts_per_step=6", "ppo.minibatch=5"], "ppo.minibatch"),
    (["engine.zero_stage=3"], "engine.zero_stage"),
    (["budget.steps=5", "budget.tokens=1e5"], "budget.steps"),
    (["policy.target=null", "reward.mode=oracle"], "reward.mode"),
    (["policy.target=null", "reward.mode=oracle_sequence"], "reward.mode"),
    (["data.dir=null", "reward.mode=ideal"], "reward.mode"),  # no pool to be ideal for
    (["policy.target=null", "reward.references=2"], "reward.references"),
    (["rollout.samples_per_prompt=1", "ppo.minibatch=32", "reward.normalize=group"],
     "reward.normalize"),
    (["reward.mode=oracle", "reward.normalize=group"], "reward.normalize"),
])
def test_bad_config_names_the_key(tmp_path, override, key):
    if key != "reward.model" and not any(o.startswith("reward.mode=") for o in override):
        override = ["reward.mode=random", *override]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_stage("rft", None, override, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_unknown_policy_id_lists_the_pool(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"policy.target: no policy 'f9m9'.*f0m0"):
        run_stage("rft", None, [f"data.dir={tiny_dataset}", "policy.target=f9m9",
                                "reward.mode=random"],
                  tmp_path / "run")


def test_sweep_finds_the_stage_config():
    from polar_scaling.rft import RFTArgs
    from polar_scaling.sweep.spec import stage_args_class

    assert stage_args_class("rft") is RFTArgs


# ------------------------------------------------------------------------------ real models


def test_local_policy_with_references_from_a_prompt_file(tiny_dataset, rm_dir, tmp_path,
                                                         one_thread):
    from polar_scaling.rft_rollout import load_setup
    from polar_scaling.tokenizer import content_char

    s = load_setup(str(tiny_dataset), None, "f0m0", None, 1, None)
    s.init.model.save_pretrained(tmp_path / "pol")
    s.tokenizer.save_pretrained(str(tmp_path / "pol"))
    text = lambda ids: "".join(content_char(i) for i in ids)  # noqa: E731
    lines = [{"prompt": text([i, i + 1, 3]), "reference": text([5, i, 2, 7])} for i in range(8)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    run = tmp_path / "run"
    summary = run_stage("rft", None, [
        "data.dir=null", f"data.prompts={prompts}", f"policy.init={tmp_path / 'pol'}",
        "policy.target=null", f"reward.model={rm_dir}", "reward.mode=rm", "budget.steps=2",
        "rollout.max_new_tokens=5", "schedule.checkpoint_every=100", *SMALL], run)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]  # no target policy: no true KL
    assert all(r["response_length"] <= 5 for r in rows)
    assert rows[0]["reward_std"] > 0  # the RM scored rollouts that differ
    assert summary["rollout_tokens"] == rows[-1]["rollout_tokens"]


# ------------------------------------------------------------------------------ benchmark


def test_throughput_benchmark_with_ladder_policies_at_fixed_length(tmp_path):
    # The GPU variant of the benchmark (random policies of a ladder size, fixed-length
    # rollouts, update FLOP/s) on a CPU ladder size: both paths run and report.
    out = tmp_path / "t.json"
    proc = subprocess.run([
        sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "rft_throughput.py"),
        "--policy-size", "t50k", "--rm-size", "t12k", "--max-new-tokens", "5",
        "--fixed-length", "--prompts-per-step", "4", "--minibatch", "8", "--steps", "1",
        "--blocks", "1", "--json", str(out)], capture_output=True, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if k not in (
            "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")},
             "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["stage_precision"] == "float32"
    assert r["policy_size"] == "t50k" and r["rollouts_per_step"] == 8
    for path in ("stage", "plain"):
        assert r[path]["response_length"] == 5.0  # no EOS: every rollout at the cap
        assert r[path]["update_model_tflops_per_s"] > 0 and r[path]["update_mfu"] is None
        assert r[path]["rollout_tokens_per_s"] > 0
    assert r["step_time_ratio"] > 0

