"""Policies, the synthetic world and the true-KL estimator."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny_world import TINY_WORLD

from polar_scaling.config import from_dict
from polar_scaling.kl import kl_matrix, sequence_kl, summarize_kl
from polar_scaling.policies import (
    HFPolicy,
    LocalHFPolicy,
    SamplingConfig,
    SyntheticPolicy,
    read_prompts_jsonl,
)
from polar_scaling.tokenizer import FIRST_CONTENT_ID, add_reward_token, reward_token_id
from polar_scaling.world import World, WorldConfig, _new_model, pool_specs, sample_prompts

EOS = 2
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_world(**kw) -> World:
    cfg = from_dict(WorldConfig, {**TINY_WORLD, **kw})
    return World(cfg, SamplingConfig(max_new_tokens=8))


def constant_policy(cfg: WorldConfig, logits: np.ndarray, policy_id: str) -> SyntheticPolicy:
    """A policy whose next-token logits ignore the context: every token embeds to the same
    vector, attention and MLP are zero, and the head reads one hidden unit."""
    model = _new_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.ones_like(p) if p.ndim == 1 else torch.zeros_like(p))
        model.model.embed_tokens.weight[:, 0] = 1.0
        # after RMSNorm the hidden state is sqrt(hidden) on unit 0
        model.lm_head.weight[:, 0] = torch.as_tensor(logits, dtype=torch.float32) / \
            cfg.arch.hidden_size ** 0.5
    return SyntheticPolicy(model, policy_id=policy_id, family=policy_id,
                           sampling=SamplingConfig(max_new_tokens=6))


# --------------------------------------------------------------------------- the world


def test_pool_structure_ids_splits_and_seeds():
    cfg = from_dict(WorldConfig, {**TINY_WORLD, "heldout_families": 1})
    specs = pool_specs(cfg)
    assert [s.policy_id for s in specs][:4] == ["f0m0", "f0m1", "f0m2", "f1m0"]
    held = {s.policy_id for s in specs if s.split == "heldout"}
    assert held == {"f0m2", "f1m2", "f2m0", "f2m1", "f2m2"}
    assert len({s.seed for s in specs}) == len(specs)


def test_policies_are_deterministic_and_reproducible_alone():
    a = tiny_world().policy("f1m2")
    w = tiny_world()
    w.policy("f0m0")  # building others first must not change f1m2
    b = w.policy("f1m2")
    for (n, x), (_, y) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(x, y), n
    c = tiny_world(seed=1).policy("f1m2")
    assert not torch.equal(a.model.lm_head.weight, c.model.lm_head.weight)
    base, member = w.policy("f1m0"), w.policy("f1m1")
    rel = (member.model.lm_head.weight - base.model.lm_head.weight).std() / \
        base.model.lm_head.weight.std()
    assert 0.2 < rel < 0.3  # within_sigma = 0.25 of the tensor's spread


def test_logit_scale_sets_logit_spread_and_entropy():
    world = World(WorldConfig(logit_scale=1.5), SamplingConfig())
    p = world.policy("f0m0")
    ids = torch.randint(FIRST_CONTENT_ID, world.cfg.vocab_size, (8, 20))
    with torch.no_grad():
        logits = p.model(input_ids=ids).logits
    assert logits.std(-1).mean().item() == pytest.approx(1.5, rel=0.1)
    logp, mask = p.log_distributions([[5 + i] for i in range(8)], ids[:, :10].tolist())
    entropy = -(logp.exp() * logp.nan_to_num(neginf=0)).sum(-1)[mask].mean().item()
    assert 3.5 < entropy < math.log(world.cfg.content_vocab + 1)


def test_default_world_kl_within_family_is_far_below_across():
    world = World(WorldConfig(), SamplingConfig(max_new_tokens=16))
    corpus = world.corpus_policy()
    prompts, _ = sample_prompts(corpus, 16, 8, 16, 16, seed=3)
    pols = [world.policy(i) for i in ("f0m0", "f0m1", "f1m0")]
    within = sequence_kl(pols[0], pols[1], prompts, 2, seed=1)
    across = sequence_kl(pols[0], pols[2], prompts, 2, seed=1)
    # design targets at the defaults: ~0.16 nats/token within a family, ~1.0 across
    assert 0.08 < within.kl_per_token < 0.35
    assert 0.6 < across.kl_per_token < 1.6
    assert abs(within.kl_per_sequence - within.kl_log_ratio) < 5 * within.stderr_per_sequence + 1


def test_corpus_prompts_are_prefixes_of_documents_without_specials():
    world = tiny_world()
    prompts, docs = sample_prompts(world.corpus_policy(), 20, 2, 5, 9, seed=0)
    assert all(len(d) == 9 for d in docs)  # the corpus never stops early
    assert all(2 <= len(p) <= 5 and d[:len(p)] == p for p, d in zip(prompts, docs, strict=True))
    assert min(min(d) for d in docs) >= FIRST_CONTENT_ID
    again, _ = sample_prompts(world.corpus_policy(), 20, 2, 5, 9, seed=0)
    assert again == prompts
    with pytest.raises(ValueError, match="min_len"):
        sample_prompts(world.corpus_policy(), 2, 6, 5, 9, seed=0)


# --------------------------------------------------------------------------- sampling


def test_generate_is_seeded_and_emits_only_content_then_eos():
    p = tiny_world().policy("f0m1")
    prompts = [[6, 7, 8], [9], [10, 11, 12, 13, 14]]
    a = p.generate(prompts, num_samples=4, seed=5)
    assert a == p.generate(prompts, num_samples=4, seed=5)
    assert a != p.generate(prompts, num_samples=4, seed=6)
    assert len(a) == 12
    for r in a:
        assert 1 <= len(r) <= 8
        body = r[:-1] if r[-1] == EOS else r
        assert all(t >= FIRST_CONTENT_ID for t in body)
    state = torch.random.get_rng_state()
    p.generate(prompts, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched


@pytest.mark.parametrize("compile_", [False, True])
def test_generate_compiles_only_on_request(compile_):
    # On CUDA transformers compiles a static-cache generate call once per input shape (RFT's
    # prompt widths change every step). Its own decision, on a device it would compile on:
    from transformers import CompileConfig, StaticCache

    p = tiny_world().policy("f0m0")
    p.sampling = SamplingConfig(max_new_tokens=8, compile=compile_)
    config = p._generation_config(False, 8)
    config.compile_config = CompileConfig()
    config.compile_config._compile_all_devices = True  # as if on a GPU
    cache = StaticCache(config=p.model.config, max_cache_len=16)
    assert p.model._valid_auto_compile_criteria({"cache": cache}, config) is compile_


def test_sampled_tokens_lie_in_the_top_k_of_the_scored_distribution():
    # Generation pads on the left, scoring on the right: if positions disagreed, sampled
    # tokens would fall outside the top-k of the distribution the scorer computes.
    world = World(from_dict(WorldConfig, TINY_WORLD), SamplingConfig(top_k=3, top_p=1.0,
                                                                       max_new_tokens=8))
    p = world.policy("f2m0")
    prompts = [[6], [7, 8, 9, 10, 11, 12], [13, 14]]
    responses = p.generate(prompts, num_samples=8, seed=0)
    flat_prompts = [x for x in prompts for _ in range(8)]
    logp, mask = p.log_distributions(flat_prompts, responses)
    for i, r in enumerate(responses):
        for t, tok in enumerate(r):
            rank = int((logp[i, t] > logp[i, t, tok]).sum())
            assert rank < 3, (i, t, rank)
    full = p.generate(prompts, num_samples=8, seed=0, full_distribution=True)
    ranks = [int((logp_row > logp_row[tok]).sum()) for logp_row, tok in
             zip(p.log_distributions(flat_prompts, full)[0][:, 0], [r[0] for r in full],
                 strict=True)]
    assert max(ranks) >= 3  # the full distribution is not truncated


def test_logprobs_do_not_depend_on_batch_padding():
    p = tiny_world().policy("f1m0")
    alone = p.logprobs([[6, 7]], [[8, 9, 10]])[0]
    batched = p.logprobs([[6, 7], [11, 12, 13, 14, 15, 16]], [[8, 9, 10], [6]])[0]
    np.testing.assert_allclose(alone, batched, atol=1e-5)
    assert alone.shape == (3,) and (alone < 0).all()


# --------------------------------------------------------------------------- true KL


def test_kl_of_a_policy_with_itself_is_exactly_zero():
    p = tiny_world().policy("f0m0")
    est = sequence_kl(p, p, [[6, 7], [8]], samples_per_prompt=4, seed=0)
    assert est.kl_per_sequence == 0.0 and est.kl_log_ratio == 0.0 and est.samples == 8


def test_kl_matches_closed_form_for_context_free_policies():
    cfg = from_dict(WorldConfig, {**TINY_WORLD, "content_vocab": 4})
    rng = np.random.default_rng(0)
    lp_logits, lq_logits = rng.normal(0, 1.5, cfg.vocab_size), rng.normal(0, 1.5, cfg.vocab_size)
    lp_logits[EOS] = lq_logits[EOS] = 0.5  # stops often enough to test the length term
    p, q = constant_policy(cfg, lp_logits, "p"), constant_policy(cfg, lq_logits, "q")
    # exact categorical distributions over the allowed tokens (content and EOS)
    dist_p = p.log_distributions([[6]], [[6]])[0][0, 0].exp().double().numpy()
    dist_q = q.log_distributions([[6]], [[6]])[0][0, 0].exp().double().numpy()
    allowed = dist_p > 0
    assert allowed.sum() == cfg.content_vocab + 1
    kl_cat = float((dist_p[allowed] * np.log(dist_p[allowed] / dist_q[allowed])).sum())
    cap = 6
    mean_len = sum((1 - dist_p[EOS]) ** t for t in range(cap))
    est = sequence_kl(p, q, [[6], [7, 8]], samples_per_prompt=400, seed=0, max_new_tokens=cap)
    # every step has the same KL, so per-token KL is exact, and per-sequence KL is
    # KL_cat x E[length] up to the Monte-Carlo error in the length
    assert est.kl_per_token == pytest.approx(kl_cat, rel=1e-4)
    assert est.mean_length == pytest.approx(mean_len, rel=0.06)
    assert est.kl_per_sequence == pytest.approx(kl_cat * mean_len, rel=0.06)
    assert abs(est.kl_log_ratio - kl_cat * mean_len) < 5 * est.stderr_per_sequence + 0.1
    reverse = sequence_kl(q, p, [[6]], samples_per_prompt=50, seed=0, max_new_tokens=cap)
    kl_rev = float((dist_q[allowed] * np.log(dist_q[allowed] / dist_p[allowed])).sum())
    assert reverse.kl_per_token == pytest.approx(kl_rev, rel=1e-4)  # KL is not symmetric


def test_kl_matrix_rows_and_summary():
    world = tiny_world()
    pols = [world.policy(i) for i in ("f0m0", "f0m1", "f1m0")]
    rows = kl_matrix(pols, [[6, 7], [8, 9]], samples_per_prompt=2, seed=0)
    assert len(rows) == 9
    assert {(r["policy_a"], r["policy_b"]) for r in rows} == \
        {(a.policy_id, b.policy_id) for a in pols for b in pols}
    assert all(r["kl_per_sequence"] == 0 for r in rows if r["policy_a"] == r["policy_b"])
    summary = summarize_kl(rows)
    assert summary["within"]["pairs"] == 2 and summary["across"]["pairs"] == 4
    assert summary["within"]["kl_per_token"] < summary["across"]["kl_per_token"]


# --------------------------------------------------------------------------- local folders


def save_tiny_local_model(path, seed=0):
    """A tiny Llama with a BOS-adding tokenizer that lacks <|reward|>, saved as a folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = list("abcdefghij ")
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=1))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return model


def test_local_folder_policy_generates_and_scores(tmp_path):
    model = save_tiny_local_model(tmp_path / "m")
    policy = LocalHFPolicy(tmp_path / "m", family="toy",
                           sampling=SamplingConfig(max_new_tokens=5))
    assert policy.policy_id == "m" and policy.prefix_ids == [0] and policy.eos_ids == [1]
    assert policy.decode(policy.encode("abc ja")) == "abc ja"
    out = policy.generate([policy.encode("abc")], num_samples=3, seed=0)
    assert len(out) == 3 and all(1 <= len(r) <= 5 for r in out)
    assert out == policy.generate([policy.encode("abc")], num_samples=3, seed=0)
    direct = HFPolicy(model, policy_id="x", eos_ids=[1], pad_id=1, prefix_ids=[0])
    np.testing.assert_allclose(policy.logprobs([[3, 4]], [[5, 6]])[0],
                               direct.logprobs([[3, 4]], [[5, 6]])[0], atol=1e-6)
    with pytest.raises(FileNotFoundError, match="policy folder not found"):
        LocalHFPolicy(tmp_path / "missing")


def test_add_reward_token_to_a_real_tokenizer(tmp_path):
    save_tiny_local_model(tmp_path / "m")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="no <\\|reward\\|> token"):
        reward_token_id(tok)
    add_reward_token(tok)
    rid = reward_token_id(tok)
    assert rid == len(tok) - 1 and tok.pad_token is not None
    assert tok.encode("ab<|reward|>", add_special_tokens=False)[-1] == rid


def test_prompts_jsonl_reading_and_errors(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "hi"}) + "\n\n" + json.dumps({"prompt": "yo"}) + "\n")
    assert read_prompts_jsonl(good) == ["hi", "yo"]
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        read_prompts_jsonl(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=f"{bad}:2: not JSON"):
        read_prompts_jsonl(bad)
    bad.write_text(json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(ValueError, match=f"{bad}:1: expected an object with a string 'prompt'"):
        read_prompts_jsonl(bad)
    bad.write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts_jsonl(bad)
