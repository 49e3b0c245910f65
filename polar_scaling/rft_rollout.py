"""What RFT acts on: the policies (initial, target), prompts, reference answers and rewards.

Two set-ups share this code:

* **Synthetic world** (``data.dir`` names a dataset from ``polar-train generate``): policies
  are pool ids (``f0m0``), rollout prompts are the dataset's ``train`` prompts, the true KL
  is measured on its ``heldout_prompts``, and the target policy writes each step's reference
  answers on the fly with the dataset's sampling settings (those the RM was trained on).
* **Real models**: ``policy.init`` (and optionally ``policy.target``) are local causal-LM
  folders and prompts come from a JSONL file, one ``{"prompt": ..., "reference": ...}`` per
  line; without a target policy every line needs a reference.

A reward function maps (prompt ids, reference ids, response ids without EOS) to one score
per rollout; the oracle control instead returns per-token rewards.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polar_scaling.config import ConfigError, from_dict
from polar_scaling.errors import StageError
from polar_scaling.jsonl import iter_jsonl
from polar_scaling.policies import HFPolicy, SamplingConfig
from polar_scaling.world import derive_seed

Ids = list[int]


@dataclass
class Setup:
    """Everything an RFT run samples from, built once per process."""

    init: HFPolicy  # the initial policy (frozen: also the KL reference)
    target: HFPolicy | None  # writes references; None when they come from the prompt file
    tokenizer: object | None  # the policies' tokenizer (None only in tests without one)
    train_prompts: list[Ids]
    eval_prompts: list[Ids]  # held-out prompts for the true KL (empty without a target)
    references: list[Ids] | None  # per train prompt, when read from a file
    reference_sampling: SamplingConfig  # how the target writes references
    max_new_tokens: int


def actor_view(template: HFPolicy, model, sampling: SamplingConfig,
               policy_id: str = "actor") -> HFPolicy:
    """An :class:`HFPolicy` around ``model`` with ``template``'s special ids (prefix, EOS,
    pad, suppressed tokens): the training policy, sampled and scored like the initial one."""
    return HFPolicy(model, policy_id=policy_id, family=template.family,
                    eos_ids=template.eos_ids, pad_id=template.pad_id,
                    prefix_ids=template.prefix_ids, suppress_ids=template.suppress_ids,
                    sampling=sampling)


def without_eos(policy: HFPolicy) -> HFPolicy:
    """The policy with its EOS ids suppressed (sharing its model): it always writes
    ``max_new_tokens`` tokens, and its log-distributions are renormalised over the rest."""
    p = copy.copy(policy)
    p.suppress_ids = sorted(set(policy.suppress_ids) | set(policy.eos_ids))
    return p


def trainable_copy(policy: HFPolicy) -> torch.nn.Module:
    """A copy of the policy's model with gradients on (the actor)."""
    model = copy.deepcopy(policy.model)
    model.requires_grad_(True)
    return model.train()


def place_frozen(setup: Setup, reward, device: torch.device, dtype: torch.dtype) -> None:
    """Move the frozen models next to the actor: the initial policy (the KL reference) and
    the reward model to ``device`` in the actor's ``dtype`` (so the reference's log-probs of
    the untouched actor match its own exactly; the RM's score head stays fp32), the target
    policy to ``device`` in its own dtype (it writes references and is the true KL's
    yardstick). On CPU in fp32, a no-op."""
    def cast(model: torch.nn.Module) -> None:
        # Parameters only, as DeepSpeed casts the actor: buffers such as the rotary
        # frequencies stay fp32 (``module.to(dtype)`` would round them too).
        model.to(device=device)
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)

    cast(setup.init.model)
    if setup.target is not None:
        setup.target.model.to(device=device)
    model = getattr(reward, "model", None)
    if isinstance(model, torch.nn.Module):
        cast(model)
        head = getattr(model, "score", None)
        if isinstance(head, torch.nn.Linear):
            head.float()  # the score head reads the hidden state in fp32: scores keep digits


# --------------------------------------------------------------------------- loading


def _is_folder(spec: str) -> bool:
    return "/" in spec or Path(spec).is_dir()


def load_setup(data_dir: str | None, prompts_file: str | None, init: str, target: str | None,
               eval_prompts: int, max_new_tokens: int | None,
               trust_remote_code: bool = False, allow_eos: bool = True) -> Setup:
    """Resolve the policies and prompts of a run; every problem is a StageError/ConfigError.
    With ``allow_eos=False`` both policies come back with EOS suppressed (fixed length)."""
    world = manifest = tokenizer = None
    sampling = SamplingConfig()
    if data_dir is not None:
        world, manifest, tokenizer, sampling = _load_world(Path(data_dir))
    if data_dir is None and prompts_file is None:
        raise ConfigError("<config>", "data", "give data.dir (a synthetic world dataset) or "
                          "data.prompts (a JSONL prompt file)")

    def policy(spec: str, key: str) -> HFPolicy:
        if _is_folder(spec):
            from polar_scaling.policies import LocalHFPolicy

            if not (Path(spec) / "config.json").is_file():
                raise StageError(f"{key}={spec} is not a causal-LM folder (no config.json)")
            return LocalHFPolicy(spec, trust_remote_code=trust_remote_code, sampling=sampling)
        if world is None:
            raise ConfigError("<config>", key, f"{spec!r} is a pool policy id, which needs "
                              f"data.dir (a synthetic world dataset); or give a model folder")
        try:
            return world.policy(spec)
        except KeyError:
            known = ", ".join(s.policy_id for s in world.specs)
            raise ConfigError("<config>", key, f"no policy {spec!r} in the world of "
                              f"{data_dir} (known: {known})") from None

    init_policy = policy(init, "policy.init")
    target_policy = policy(target, "policy.target") if target is not None else None
    if tokenizer is None:
        tokenizer = getattr(init_policy, "tokenizer", None)
    for key, p in (("policy.init", init_policy), ("policy.target", target_policy)):
        if p is not None and getattr(p, "tokenizer", None) is not None and tokenizer is not None:
            check_same_tokenizer(p.tokenizer, tokenizer, f"{key} ({p.policy_id})",
                                 "the dataset's" if manifest else "policy.init's")
    if init_policy.model.config.vocab_size != (target_policy or init_policy).model.config.vocab_size:
        raise StageError("policy.init and policy.target have different vocabularies")
    if not allow_eos:
        init_policy = without_eos(init_policy)
        target_policy = without_eos(target_policy) if target_policy is not None else None

    references = None
    if prompts_file is not None:
        texts, refs = read_prompt_file(prompts_file, need_reference=target_policy is None)
        encode = _encoder(tokenizer, prompts_file)
        prompts = [encode(t) for t in texts]
        if target_policy is None:
            train_prompts, held = prompts, []
            references = [encode(r) for r in refs]
        else:  # the last prompts are held out for the true KL
            n_eval = min(eval_prompts, len(prompts) // 2)
            train_prompts, held = prompts[:len(prompts) - n_eval], prompts[len(prompts) - n_eval:]
    else:
        train_prompts = _split_prompts(Path(data_dir), "train")
        held = _split_prompts(Path(data_dir), "heldout_prompts")[:eval_prompts]
    if not train_prompts:
        raise StageError("no training prompts")
    cap = max_new_tokens or sampling.max_new_tokens
    return Setup(init_policy, target_policy, tokenizer, train_prompts,
                 held if target_policy is not None else [], references, sampling, cap)


def _load_world(data_dir: Path):
    from polar_scaling.data import read_manifest
    from polar_scaling.tokenizer import load_tokenizer
    from polar_scaling.world import World, WorldConfig

    manifest = read_manifest(data_dir)
    if manifest.get("pool") != "synthetic":
        raise StageError(f"data.dir {data_dir} holds a {manifest.get('pool')!r} pool, not a "
                         f"synthetic world; use data.prompts and model folders for real policies")
    source = str(data_dir / "manifest.json")
    cfg = from_dict(WorldConfig, manifest["config"]["world"], source, "world.")
    sampling = from_dict(SamplingConfig, manifest["config"]["sampling"], source, "sampling.")
    return World(cfg, sampling), manifest, load_tokenizer(data_dir / "tokenizer"), sampling


def _split_prompts(data_dir: Path, split: str) -> list[Ids]:
    """The distinct prompts of a dataset split, in prompt-id order."""
    from polar_scaling.data import TrajectoryDataset

    t = TrajectoryDataset(data_dir).load(split)
    _, first = np.unique(t.prompt_id, return_index=True)
    return [t.prompts[int(i)].astype(np.int64).tolist() for i in first]


def _encoder(tokenizer, source):
    if tokenizer is None:
        raise StageError(f"{source}: text prompts need a tokenizer (a dataset or model folder)")
    return lambda text: list(tokenizer.encode(text, add_special_tokens=False))


def read_prompt_file(path: str | Path, need_reference: bool) -> tuple[list[str], list[str | None]]:
    """Prompts and references from JSONL (``{"prompt": str, "reference": str}`` per line).

    A line without a non-empty ``reference`` is an error when ``need_reference`` (POLAR
    scores every rollout against a reference answer)."""
    path = Path(path)
    prompts, refs = [], []
    for where, obj in iter_jsonl(path, StageError, StageError, "prompts file"):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise StageError(f"{where}: expected an object with a string 'prompt'")
        ref = obj.get("reference")
        if need_reference and (not isinstance(ref, str) or not ref.strip()):
            raise StageError(f"{where}: no 'reference' answer; POLAR scores each rollout "
                             f"against a reference, so every prompt needs one (or set "
                             f"policy.target to sample references from a target policy)")
        prompts.append(obj["prompt"])
        refs.append(ref)
    if not prompts:
        raise StageError(f"{path}: no prompts")
    return prompts, refs


def check_same_tokenizer(tok, other, what: str, other_name: str) -> None:
    """A StageError unless the two tokenizers map the same strings to the same ids."""
    if tok.get_vocab() != other.get_vocab():
        raise StageError(f"{what} has a tokenizer of {len(tok)} tokens that differs from "
                         f"{other_name} ({len(other)} tokens); the reward model reads token "
                         f"ids, so policy and reward model must share one tokenizer")


# --------------------------------------------------------------------------- prompts


def step_prompts(n_prompts: int, step: int, per_step: int, rank: int, world: int,
                 seed: int) -> list[int]:
    """Indices of this rank's prompts at ``step``: consecutive slices of a fresh permutation
    per pass over the prompts (a pure function of its arguments, so resume is exact)."""
    per_rank = per_step // world
    start = step * per_step + rank * per_rank
    out = []
    for k in range(start, start + per_rank):
        epoch, pos = divmod(k, n_prompts)
        out.append(int(_prompt_order(n_prompts, seed, epoch)[pos]))
    return out


@functools.lru_cache(maxsize=4)
def _prompt_order(n_prompts: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 0x5F, epoch]).permutation(n_prompts)


def strip_eos(response: Sequence[int], eos_ids: Sequence[int]) -> Ids:
    """The response as the reward model reads it: without a final EOS (datasets store none)."""
    r = list(response)
    return r[:-1] if r and r[-1] in eos_ids else r


# --------------------------------------------------------------------------- rewards


class RMReward:
    """Scores of a POLAR reward model, read against the reference (the RFT reward)."""

    def __init__(self, rm_dir: str | Path, policy_tokenizer, batch_size: int = 64,
                 untrained_seed: int | None = None):
        from polar_scaling.model import RewardModel
        from polar_scaling.template import TemplateIds
        from polar_scaling.tokenizer import load_tokenizer

        rm_dir = Path(rm_dir)
        try:
            model = RewardModel.from_pretrained(rm_dir)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise StageError(f"reward.model {rm_dir} is not a reward model: {e}") from None
        try:
            self.tokenizer = load_tokenizer(rm_dir)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise StageError(f"reward.model {rm_dir} has no usable tokenizer: {e}") from None
        if policy_tokenizer is not None:
            check_same_tokenizer(policy_tokenizer, self.tokenizer, "the policy",
                                 f"the reward model's ({rm_dir})")
        if untrained_seed is not None:  # the same architecture, fresh weights: a control
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(untrained_seed)
                model = RewardModel.from_config(model.config, model.meta)
        self.model = model.eval()
        self.meta = dict(model.meta)
        self.encoding = self.meta.get("encoding", "ids")
        self.wrapper = self.meta.get("wrapper") or "sft"
        self.ids = TemplateIds.from_tokenizer(self.tokenizer, self.meta.get("max_length"),
                                              self.meta.get("max_response_length"))
        self.batch_size = batch_size
        self.pad_id = self.tokenizer.pad_token_id

    def __call__(self, prompts: Sequence[Ids], references: Sequence[Ids],
                 responses: Sequence[Ids]) -> torch.Tensor:
        from polar_scaling.scoring import forward_scores, length_sorted_batches, score
        from polar_scaling.template import encode_polar

        if self.encoding != "ids":  # a converted released model reads text
            dec = self.tokenizer.decode
            items = [{"prompt": dec(p), "reference": dec(r), "output": dec(o),
                      "wrapper": self.wrapper}
                     for p, r, o in zip(prompts, references, responses, strict=True)]
            return torch.tensor(score(items, self.model, self.tokenizer, self.batch_size),
                                dtype=torch.float64)
        seqs = [encode_polar(p, r, o, self.ids, self.wrapper)
                for p, r, o in zip(prompts, references, responses, strict=True)]
        out = forward_scores(self.model, seqs, length_sorted_batches([len(s) for s in seqs],
                                                                     self.batch_size), self.pad_id)
        return torch.tensor(out, dtype=torch.float64) + float(self.meta.get("score_offset", 0.0))


class RandomReward:
    """A control: standard normal scores that ignore the rollout (seeded per step and rank)."""

    def __init__(self, seed: int):
        self.seed = seed

    def scores(self, n: int, step: int, rank: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "random-reward", step, rank))
        return torch.randn(n, generator=g, dtype=torch.float64)


def oracle_token_rewards(target: HFPolicy, prompts: Sequence[Ids],
                         responses: Sequence[Ids], logp: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """Per-token ``log target(y_t) - log π(y_t)``: its expected sum is ``-KL(π || target)``,
    so PPO on it minimises the true KL directly (a ceiling for what a reward model can do)."""
    lt = target.logprobs(prompts, responses)
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for i, row in enumerate(lt):
        out[i, :len(row)] = torch.as_tensor(row)
    return (out - logp.double()) * mask
