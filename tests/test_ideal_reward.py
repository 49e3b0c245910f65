"""The Bayes-optimal POLAR discriminator of a synthetic world (``reward.mode=ideal``): its
negative weights, its closed form for two policies, its calibration on triplets drawn as
pre-training draws them, and the sequence-level oracle; both as RFT rewards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from polar_scaling.cli import run_stage
from polar_scaling.ideal_reward import IdealReward, negative_weights
from polar_scaling.rft_rollout import strip_eos
from polar_scaling.rundir import read_jsonl

CAP = 6  # the tiny dataset's max_new_tokens


def test_negative_weights_follow_the_same_family_share():
    fams = ["f0", "f0", "f1", "f1", "f2"]
    w = negative_weights(fams, 0.0)
    assert np.allclose(w.sum(1), 1) and np.all(np.diag(w) == 0)
    assert w[0, 1] == 0 and w[0, 2] == pytest.approx(1 / 3)
    w = negative_weights(fams, 0.25)
    assert w[0, 1] == pytest.approx(0.25) and w[0, 4] == pytest.approx(0.75 / 3)
    assert w[4, 4] == 0 and w[4, 0] == pytest.approx(0.25)  # no family member: all others


def total_logp(policy, prompts, responses):
    seqs = [list(r) + ([policy.eos_ids[0]] if len(r) < CAP else []) for r in responses]
    return np.array([lp.sum() for lp in policy.logprobs(prompts, seqs)])


def test_two_policies_give_the_closed_form_log_odds(tiny_dataset, one_thread):
    ideal = IdealReward(tiny_dataset, CAP)
    p, q = ideal.policies[0], ideal.policies[-1]  # f0m0 and the last family's member
    assert p.family != q.family
    ideal.policies = [p, q]
    ideal.log_w = torch.log(torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64))
    prompts = [[5, 6, 7], [8, 9]] * 4
    refs = [strip_eos(y, p.eos_ids) for y in p.generate(prompts[:4], 1, seed=1)] + \
        [strip_eos(y, q.eos_ids) for y in q.generate(prompts[4:], 1, seed=2)]
    cands = [strip_eos(y, p.eos_ids) for y in q.generate(prompts, 1, seed=3)]
    pr, qr = total_logp(p, prompts, refs), total_logp(q, prompts, refs)
    py, qy = total_logp(p, prompts, cands), total_logp(q, prompts, cands)
    expect = np.logaddexp(pr + py, qr + qy) - np.logaddexp(pr + qy, qr + py)
    assert np.allclose(ideal(prompts, refs, cands).numpy(), expect, atol=1e-6)
    # a short response is scored with its EOS: the cap changes its score
    short = [r[:2] for r in cands]
    assert not np.allclose(ideal(prompts, refs, short).numpy(),
                           IdealReward(tiny_dataset, 2)(prompts, refs, short).numpy())


def test_ideal_scores_are_calibrated_log_odds_of_a_positive(tiny_dataset, one_thread):
    # Triplets drawn as pre-training draws them (reference policy uniform over the training
    # pool, positive from it, negative from another family), full distributions: the
    # Bayes-optimal log-odds must beat any rescaling of themselves on the logistic loss.
    ideal = IdealReward(tiny_dataset, CAP)
    pols = ideal.policies
    rng = np.random.default_rng(0)
    prompts, refs, cands, labels = [], [], [], []
    for i in range(120):
        a = int(rng.integers(len(pols)))
        others = [j for j in range(len(pols)) if pols[j].family != pols[a].family]
        b = int(rng.choice(others))
        x = [int(t) for t in rng.integers(3, 19, size=3)]
        r, pos = (strip_eos(y, pols[a].eos_ids) for y in pols[a].generate(
            [x], 2, seed=10 + i, full_distribution=True))
        (neg,) = (strip_eos(y, pols[b].eos_ids) for y in pols[b].generate(
            [x], 1, seed=1000 + i, full_distribution=True))
        prompts += [x, x]
        refs += [r, r]
        cands += [pos, neg]
        labels += [1.0, 0.0]
    s = ideal(prompts, refs, cands).numpy()
    y = np.array(labels)

    def loss(c):
        return float(np.mean(np.logaddexp(0, -c * s) * y + np.logaddexp(0, c * s) * (1 - y)))

    assert loss(1.0) < min(loss(0.5), loss(2.0)) and loss(1.0) < math.log(2)
    assert (s[y == 1] > s[y == 0]).mean() > 0.7


@pytest.mark.parametrize("mode", ["ideal", "oracle_sequence"])
def test_ideal_and_sequence_oracle_rewards_drive_rft(tiny_dataset, tmp_path,
                                                                  one_thread, mode):
    run = tmp_path / mode
    summary = run_stage("rft", None, [
        f"data.dir={tiny_dataset}", f"reward.mode={mode}", "budget.steps=12",
        "rollout.prompts_per_step=16", "rollout.samples_per_prompt=2", "ppo.minibatch=16",
        "reward.normalize=group", "optim.lr=1e-2", "eval.prompts=6",
        "eval.samples_per_prompt=4", "schedule.eval_points=2",
        "schedule.checkpoint_every=100", "schedule.progress=false"], run)
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "reward_mean" in r]
    assert rows[-1]["reward_mean"] > rows[0]["reward_mean"]
    # the start's samples are another family's: scored as negatives against the references
    assert rows[0]["reward_mean"] < 0
    if mode == "oracle_sequence":  # the exact log-ratio, as one score per rollout
        assert summary["true_kl_fall"] > 0.2, summary
    else:  # in this tiny world the pool's optimum is a weak pull (docs/rft.md measures it)
        assert summary["final_eval"]["true_kl_to_init"] > 0.05, summary
