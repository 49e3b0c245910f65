"""Policies: causal LMs that write trajectories and report exact log-probabilities.

A :class:`Policy` works on token ids of its own tokenizer. Prompts are passed *without* the
model's leading special tokens (``prefix_ids``, e.g. BOS); responses come back without the
prompt, ending with the EOS id when the policy stopped before ``max_new_tokens``.

Two distributions matter and are kept apart:
- the *sampling* distribution of the trajectories: HF ``generate`` at the configured
  temperature, top-p and top-k (the paper's 1.0 / 0.9 / 50);
- the policy's *full* distribution: temperature 1, no top-k/top-p truncation. It is what
  :meth:`Policy.log_distributions` returns, what the true-KL estimator samples from
  (``full_distribution=True``), and what "true KL" means in this project.
Both mask ``suppress_ids`` (tokens a policy may never emit, e.g. pad and the reward token).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from polar_scaling.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS

Ids = Sequence[int]


@dataclass
class SamplingConfig:
    """How trajectories are sampled (defaults: the POLAR paper's settings)."""

    temperature: float = field(default=1.0, metadata={"gt": 0})
    top_p: float = field(default=0.9, metadata={"gt": 0, "le": 1})
    top_k: int = field(default=50, metadata={"ge": 0})  # 0: no top-k
    max_new_tokens: int = field(default=32, metadata={"gt": 0})
    batch_size: int = field(default=1024, metadata={"gt": 0})  # sequences per generate call
    static_cache: bool = True  # preallocated KV cache: ~20% faster for tiny models on CPU
    # On CUDA, transformers compiles the forward pass of a static-cache generate call, once
    # per new input shape; RFT's prompt widths change every step, so by default it does not.
    compile: bool = False


class Policy(ABC):
    """A language model that writes responses to prompts and scores given responses."""

    policy_id: str
    family: str

    @abstractmethod
    def generate(self, prompts: Sequence[Ids], num_samples: int = 1, seed: int = 0,
                 full_distribution: bool = False,
                 max_new_tokens: int | None = None) -> list[list[int]]:
        """``num_samples`` responses per prompt (prompt-major order), deterministic in ``seed``."""

    @abstractmethod
    def log_distributions(self, prompts: Sequence[Ids],
                          responses: Sequence[Ids]) -> tuple[torch.Tensor, torch.Tensor]:
        """Full next-token log-distributions along each response: ``[N, T, V]`` and a ``[N, T]``
        mask, where step ``t`` conditions on the prompt and ``response[:t]``."""

    def logprobs(self, prompts: Sequence[Ids], responses: Sequence[Ids]) -> list[np.ndarray]:
        """Exact log-probability (full distribution) of each response token."""
        logp, mask = self.log_distributions(prompts, responses)
        index = torch.zeros(mask.shape, dtype=torch.long)
        for i, r in enumerate(responses):
            index[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        picked = logp.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return [picked[i, :len(r)].numpy().astype(np.float64) for i, r in enumerate(responses)]


class HFPolicy(Policy):
    """A policy backed by an HF causal LM (shared by synthetic and local-folder policies)."""

    def __init__(self, model, *, policy_id: str, family: str = "", eos_ids: Sequence[int],
                 pad_id: int, prefix_ids: Ids = (), suppress_ids: Ids = (),
                 sampling: SamplingConfig | None = None):
        self.model = model.eval()
        self.policy_id, self.family = policy_id, family
        self.eos_ids = [int(i) for i in eos_ids]
        self.pad_id = int(pad_id)
        self.prefix_ids = [int(i) for i in prefix_ids]
        self.suppress_ids = sorted({int(i) for i in suppress_ids})
        self.sampling = sampling or SamplingConfig()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _generation_config(self, full: bool, max_new_tokens: int):
        from transformers import GenerationConfig

        s = self.sampling
        return GenerationConfig(
            do_sample=True, temperature=1.0 if full else s.temperature,
            top_p=1.0 if full else s.top_p, top_k=0 if full else s.top_k,
            max_new_tokens=max_new_tokens, min_new_tokens=0, pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids, suppress_tokens=self.suppress_ids or None,
            cache_implementation="static" if s.static_cache else None,
            disable_compile=not s.compile)

    def generate(self, prompts, num_samples=1, seed=0, full_distribution=False,
                 max_new_tokens=None):
        n_new = max_new_tokens or self.sampling.max_new_tokens
        config = self._generation_config(full_distribution, n_new)
        inputs = [self.prefix_ids + list(p) for p in prompts for _ in range(num_samples)]
        if any(not seq for seq in inputs):
            raise ValueError("an empty prompt needs a policy with prefix ids (e.g. BOS)")
        out: list[list[int]] = []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)  # generate samples from the global RNG
            for chunk in _chunks(inputs, self.sampling.batch_size):
                ids, mask = _pad(chunk, self.pad_id, left=True)
                ids, mask = ids.to(self.device), mask.to(self.device)
                new = self.model.generate(input_ids=ids, attention_mask=mask,
                                          generation_config=config)[:, ids.shape[1]:]
                out.extend(_cut_at_eos(new.cpu().numpy(), self.eos_ids))
        return out

    def log_distributions(self, prompts, responses):
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        width = max((len(r) for r in responses), default=0)
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(prompts), self.sampling.batch_size):
                ps = prompts[start:start + self.sampling.batch_size]
                rs = responses[start:start + self.sampling.batch_size]
                chunks.append(self._log_distributions(ps, rs, width))
        vocab = self.model.config.vocab_size
        logp = torch.cat(chunks) if chunks else torch.zeros(0, width, vocab)
        mask = torch.zeros(len(responses), width, dtype=torch.bool)
        for i, r in enumerate(responses):
            mask[i, :len(r)] = True
        return logp, mask

    def _log_distributions(self, prompts, responses, width):
        heads = [self.prefix_ids + list(p) for p in prompts]
        # Right padding keeps every real token at its natural position, so no position ids.
        ids, mask = _pad([h + list(r) for h, r in zip(heads, responses, strict=True)],
                         self.pad_id, left=False)
        logits = self.model(input_ids=ids.to(self.device),
                            attention_mask=mask.to(self.device)).logits.float().cpu()
        # Step t of response i is predicted at position len(head_i) - 1 + t.
        starts = torch.as_tensor([len(h) - 1 for h in heads])
        pos = (starts[:, None] + torch.arange(width)[None, :]).clamp(max=ids.shape[1] - 1)
        picked = logits.gather(1, pos[:, :, None].expand(-1, -1, logits.shape[-1]))
        if self.suppress_ids:
            picked[..., self.suppress_ids] = float("-inf")
        return torch.log_softmax(picked, dim=-1)


class SyntheticPolicy(HFPolicy):
    """A tiny Llama of the synthetic world (see :mod:`polar_scaling.world` for its weights).

    Prompts start after BOS; a policy may emit content tokens and EOS, nothing else (the
    corpus policy, ``allow_eos=False``, only content tokens).
    """

    def __init__(self, model, *, policy_id: str, family: str = "", seed: int = 0,
                 sampling: SamplingConfig | None = None, allow_eos: bool = True):
        ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        newline_id = len(SPECIAL_TOKENS)
        suppress = [i for t, i in ids.items() if t != EOS_TOKEN or not allow_eos] + [newline_id]
        super().__init__(model, policy_id=policy_id, family=family, eos_ids=[ids[EOS_TOKEN]],
                         pad_id=ids[PAD_TOKEN], prefix_ids=[ids[BOS_TOKEN]],
                         suppress_ids=suppress, sampling=sampling)
        self.seed = seed


class LocalHFPolicy(HFPolicy):
    """Any causal-LM folder on disk (config, weights, tokenizer); never reaches a hub.

    ``prefix_ids`` are the special tokens the folder's tokenizer puts before text (e.g. BOS),
    found by encoding with and without special tokens. ``trust_remote_code`` only on request.
    """

    def __init__(self, path: str | Path, *, policy_id: str | None = None, family: str = "",
                 trust_remote_code: bool = False, sampling: SamplingConfig | None = None,
                 device: str = "cpu", dtype: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"policy folder not found: {path}")
        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, local_files_only=True,
            dtype=getattr(torch, dtype) if dtype else None).to(device)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"policy at {path} has no EOS token")
        eos_ids = [eos] if isinstance(eos, int) else list(eos)
        pad = self.tokenizer.pad_token_id
        pad = eos_ids[0] if pad is None else pad
        with_special = self.tokenizer.encode("a", add_special_tokens=True)
        plain = self.tokenizer.encode("a", add_special_tokens=False)
        prefix = with_special[:with_special.index(plain[0])] if plain and plain[0] in \
            with_special else []
        super().__init__(model, policy_id=policy_id or path.name, family=family, eos_ids=eos_ids,
                         pad_id=pad, prefix_ids=prefix, suppress_ids=[], sampling=sampling)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Ids) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.eos_ids],
                                     skip_special_tokens=True)


def read_prompts_jsonl(path: str | Path) -> list[str]:
    """Prompts from a JSONL file, one ``{"prompt": "..."}`` object per line (blank lines skipped).

    A missing file is a FileNotFoundError; a bad line is a ValueError naming ``file:line``.
    """
    from polar_scaling.jsonl import iter_jsonl

    prompts = []
    for where, obj in iter_jsonl(path, what="prompts file"):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f"{where}: expected an object with a string 'prompt'")
        prompts.append(obj["prompt"])
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


# --------------------------------------------------------------------------- internals


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _pad(seqs: Sequence[Ids], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        row = torch.as_tensor(list(s), dtype=torch.long)
        if left:
            ids[i, width - len(s):], mask[i, width - len(s):] = row, 1
        else:
            ids[i, :len(s)], mask[i, :len(s)] = row, 1
    return ids, mask


def _cut_at_eos(new: np.ndarray, eos_ids: list[int]) -> list[list[int]]:
    """Rows up to and including the first EOS (later positions are generate's padding)."""
    is_eos = np.isin(new, eos_ids)
    has = is_eos.any(axis=1)
    ends = np.where(has, is_eos.argmax(axis=1) + 1, new.shape[1])
    return [row[:end].tolist() for row, end in zip(new, ends, strict=True)]
