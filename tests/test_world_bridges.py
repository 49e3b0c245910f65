"""Bridge policies of the synthetic world: policies at graded distances between families."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import yaml
from tiny_world import TINY_WORLD, tiny_args

from polar_scaling.config import ConfigError, from_dict
from polar_scaling.data import TripletSource, read_manifest
from polar_scaling.data_generate import generate
from polar_scaling.kl import sequence_kl
from polar_scaling.policies import SamplingConfig
from polar_scaling.world import World, WorldConfig, bridge_ends, pool_specs, sample_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def world(**kw) -> World:
    return World(from_dict(WorldConfig, {**TINY_WORLD, **kw}), SamplingConfig(max_new_tokens=8))


def digest(policy) -> str:
    h = hashlib.sha256()
    for p in policy.model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()[:16]


def test_bridge_ids_families_splits_and_seeds():
    cfg = from_dict(WorldConfig, {**TINY_WORLD, "bridges": 2, "heldout_families": 1})
    specs = pool_specs(cfg)
    plain = pool_specs(from_dict(WorldConfig, {**TINY_WORLD, "heldout_families": 1}))
    assert specs[:len(plain)] == plain  # bridges only add policies
    bridges = specs[len(plain):]
    assert [s.policy_id for s in bridges] == ["b0-1t1", "b0-1t2", "b0-2t1", "b0-2t2",
                                              "b1-2t1", "b1-2t2"]
    assert all(s.family == s.policy_id and s.member == 0 for s in bridges)  # own family each
    assert {s.policy_id for s in bridges if s.split == "heldout"} == \
        {"b0-2t1", "b0-2t2", "b1-2t1", "b1-2t2"}  # an end in the held-out family 2
    assert len({s.seed for s in specs}) == len(specs)
    assert bridge_ends("b0-12t3") == (0, 12, 3)
    assert bridge_ends("f0m1") is None and bridge_ends("b0-1") is None
    with pytest.raises(ConfigError, match="bridges"):
        from_dict(WorldConfig, {**TINY_WORLD, "bridges": -1})


def test_default_world_is_unchanged():
    # weights of the tiny world as drawn before bridges existed
    w = world()
    assert w.cfg.bridges == 0 and len(w.specs) == 9
    assert digest(w.policy("f1m2")) == "404e13fa49a88c85"
    assert digest(w.policy("f2m0")) == "183bf453a42ebc50"
    assert digest(world(bridges=3).policy("f1m2")) == "404e13fa49a88c85"


def test_bridges_are_deterministic_interpolations_of_the_family_bases():
    w = world(bridges=3)
    alone = world(bridges=3).policy("b0-2t2")
    w.policy("f1m1")
    assert digest(w.policy("b0-2t2")) == digest(alone)
    assert digest(world(bridges=3, seed=1).policy("b0-2t2")) != digest(alone)
    a, b = (w.policy(f).model.lm_head.weight for f in ("f0m0", "f2m0"))
    cos = []
    for i in (1, 2, 3):
        head = w.policy(f"b0-2t{i}").model.lm_head.weight
        t = i / 4  # the spread (hence the logit scale) is the ends' spread, interpolated
        assert float(head.std()) == pytest.approx(float((1 - t) * a.std() + t * b.std()),
                                                  rel=1e-5)
        cos.append([float(torch.cosine_similarity(head.ravel(), x.ravel(), dim=0))
                    for x in (a, b)])
    cos = np.array(cos)
    assert np.all(np.diff(cos[:, 0]) < 0) and np.all(np.diff(cos[:, 1]) > 0)
    mid = w.policy("b0-2t2").model.lm_head.weight  # t = 1/2: a multiple of a + b
    assert torch.allclose(mid / mid.std(), (a + b) / (a + b).std(), atol=1e-5)


def test_bridge_true_kl_is_graded_between_the_ends():
    w = world(bridges=3, logit_scale=3.0)
    prompts, _ = sample_prompts(w.corpus_policy(), 48, 2, 5, 5, seed=2)
    bridges = ["b0-1t1", "b0-1t2", "b0-1t3"]
    pol = {i: w.policy(i) for i in ["f0m0", *bridges, "f1m0"]}

    def kl(p, q):
        return sequence_kl(pol[p], pol[q], prompts, 4, seed=1).kl_per_token

    to_a, to_b = np.array([kl(i, "f0m0") for i in bridges]), np.array([kl(i, "f1m0")
                                                                       for i in bridges])
    a_to_b, b_to_a = kl("f0m0", "f1m0"), kl("f1m0", "f0m0")  # 4.6 and 3.9 nats per token
    assert np.all(np.diff(to_a) > 0.3) and np.all(np.diff(to_b) < -0.3)  # graded along t
    assert to_a[0] < 0.3 * b_to_a and to_b[-1] < 0.3 * a_to_b  # the near ends are near
    # and no bridge is farther from an end than the other end is (the far side saturates
    # at about that distance: KL is not a metric)
    assert np.all(to_a < 1.1 * b_to_a) and np.all(to_b < 1.1 * a_to_b)


def test_generate_with_bridges_and_reopen_a_dataset_written_before_them(tmp_path):
    summary = generate(tiny_args("world.bridges=1"), tmp_path / "b")
    policies = read_manifest(tmp_path / "b")["policies"]
    assert [p["policy_id"] for p in policies][9:] == ["b0-1t1", "b0-2t1", "b1-2t1"]
    assert summary["train_trajectories"] == 16 * 3 * 9  # 6 train members + 3 bridges
    source = TripletSource(tmp_path / "b", "train", seed=0, same_family_share=0.0)
    a, b = set(source.policy_a.tolist()), set(source.policy_b.tolist())
    assert {"b0-1t1", "b0-2t1", "b1-2t1"} <= a & b  # bridges are references and negatives
    assert not source.same_family.any()

    old = tmp_path / "old"
    generate(tiny_args(), old)
    config = yaml.safe_load((old / "config.yaml").read_text())
    del config["world"]["bridges"]  # as written before the key existed
    (old / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    generate(tiny_args(), old)  # reopens; a non-default value would be refused
    with pytest.raises(Exception, match="bridges"):
        generate(tiny_args("world.bridges=1"), old)
