"""The pool behind a ``generate`` run: its policies, prompts and tokenizer, in one process.

:class:`Runtime` hides the difference between the synthetic world (policies built from
seeds, prompts cut from corpus documents, the world tokenizer) and a local pool (model
folders, prompts from JSONL, the dataset tokenizer being the reward model's). Policies write
in their own tokenizer; everything stored is in the dataset tokenizer (for the synthetic world
the two are the same, so no text round trip happens).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from polar_scaling.config import from_dict
from polar_scaling.errors import StageError
from polar_scaling.world import World, derive_seed, pool_specs, sample_prompts


@dataclass
class ShardPrompts:
    ids: list[int]  # prompt ids
    tokens: list[list[int]]  # each prompt in the dataset tokenizer
    text: list[str] | None  # each prompt's text (JSONL prompts)
    docs: list[list[int]] | None  # corpus documents the prompts were cut from


class Runtime:
    """Everything a shard or the KL matrix needs; built the same in every worker process."""

    def __init__(self, args):
        self.args = args
        self.seed = args.seed
        self._policies: dict[int, object] = {}
        self._corpus = None
        if args.pool == "synthetic":
            self.world = World(args.world, args.sampling)
            self.specs = [{"policy_id": s.policy_id, "family": s.family, "member": s.member,
                           "split": s.split, "seed": s.seed} for s in pool_specs(args.world)]
            from polar_scaling.tokenizer import build_world_tokenizer

            self.tokenizer = build_world_tokenizer(args.world.content_vocab)
        else:
            self.world = None
            self.specs = [{"policy_id": p.id or Path(p.path).name, "family": p.family or
                           (p.id or Path(p.path).name), "member": 0,
                           "split": "heldout" if p.heldout else "train", "seed": 0,
                           "path": p.path} for p in args.local.policies]
            self.tokenizer = self._local_tokenizer()
        self._check_pool()
        self._texts = self._read_prompts() if args.prompts.source == "jsonl" else None

    # ------------------------------------------------------------------ validation

    def _check_pool(self) -> None:
        where = "world.families" if self.args.pool == "synthetic" else "local.policies"
        if not self.specs:
            raise StageError(f"the pool is empty ({where}); a POLAR triplet needs two policies")
        train = [s for s in self.specs if s["split"] == "train"]
        if len(train) < 2:
            raise StageError(
                f"the pool has {len(train)} training polic{'y' if len(train) == 1 else 'ies'} "
                f"({len(self.specs)} in all): no negatives are possible; a triplet needs a second "
                f"policy B ≠ A")
        ids = [s["policy_id"] for s in self.specs]
        if len(set(ids)) != len(ids):
            raise StageError(f"policy ids are not unique: {sorted(ids)}")
        if self.args.prompts.heldout_policies and len(train) == len(self.specs):
            raise StageError("prompts.heldout_policies > 0 but no policy is held out; hold some "
                             "out or set prompts.heldout_policies=0")

    def _read_prompts(self) -> list[str]:
        from polar_scaling.policies import read_prompts_jsonl

        try:
            texts = read_prompts_jsonl(self.args.prompts.path)
        except (FileNotFoundError, ValueError) as e:
            raise StageError(f"prompts.path: {e}") from None
        need = self.args.prompts.total
        if len(texts) < need:
            raise StageError(f"prompts.path {self.args.prompts.path} holds {len(texts)} prompts; "
                             f"the splits need {need} (train + heldout_prompts + "
                             f"heldout_policies)")
        if self.world is not None:
            unk = self.tokenizer.unk_token_id
            for i, t in enumerate(texts[:need]):
                if unk in self.tokenizer.encode(t, add_special_tokens=False):
                    raise StageError(f"prompts.path prompt {i + 1} has characters outside the "
                                     f"synthetic world's alphabet")
        return texts[:need]

    def _local_tokenizer(self):
        from transformers import AutoTokenizer

        from polar_scaling.tokenizer import add_reward_token

        src = self.args.local.tokenizer or (self.args.local.policies[0].path
                                            if self.args.local.policies else None)
        if src is None:
            return None
        if not Path(src).is_dir():
            raise StageError(f"tokenizer folder not found: {src}")
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True,
                                            trust_remote_code=self.args.local.trust_remote_code)
        return add_reward_token(tok)

    # ------------------------------------------------------------------ tables

    def save_tokenizer(self, path: Path) -> None:
        self.tokenizer.save_pretrained(str(path))

    def token_ids(self) -> dict:
        from polar_scaling.tokenizer import newline_ids, reward_token_id

        t = self.tokenizer
        return {"pad": t.pad_token_id, "bos": t.bos_token_id, "eos": t.eos_token_id,
                "reward": reward_token_id(t), "newline": newline_ids(t), "vocab_size": len(t)}

    def policy_table(self) -> list[dict]:
        return [{"index": i, **s} for i, s in enumerate(self.specs)]

    def writers(self, split: str) -> list[int]:
        """Policies that write for prompts of ``split`` (held-out ones only for their split)."""
        return [i for i, s in enumerate(self.specs)
                if s["split"] == "train" or split == "heldout_policies"]

    def trajectories_in(self, shard: dict) -> int:
        lo, hi = shard["prompts"]
        return (hi - lo) * self.args.samples_per_policy * len(self.writers(shard["split"]))

    # ------------------------------------------------------------------ work

    def policy(self, index: int):
        if index not in self._policies:
            spec = self.specs[index]
            if self.world is not None:
                self._policies[index] = self.world.policy(spec["policy_id"])
            else:
                from polar_scaling.policies import LocalHFPolicy

                a = self.args.local
                self._policies[index] = LocalHFPolicy(
                    spec["path"], policy_id=spec["policy_id"], family=spec["family"],
                    trust_remote_code=a.trust_remote_code, sampling=self.args.sampling,
                    device=a.device, dtype=a.dtype)
        return self._policies[index]

    def corpus(self):
        if self._corpus is None:
            self._corpus = self.world.corpus_policy()
        return self._corpus

    def corpus_seed(self, shard: dict) -> int:
        return derive_seed(self.seed, "prompts", shard["index"])

    def prompts_for(self, shard: dict) -> ShardPrompts:
        lo, hi = shard["prompts"]
        ids = list(range(lo, hi))
        if self._texts is not None:
            texts = self._texts[lo:hi]
            tokens = [list(self.tokenizer.encode(t, add_special_tokens=False)) for t in texts]
            return ShardPrompts(ids, tokens, texts, None)
        p = self.args.prompts
        prompts, docs = sample_prompts(self.corpus(), hi - lo, p.min_len, p.max_len,
                                       p.max_len + self.args.sampling.max_new_tokens,
                                       self.corpus_seed(shard))
        return ShardPrompts(ids, prompts, None, docs)

    def generate(self, index: int, sp: ShardPrompts, n: int,
                 seed: int) -> tuple[list[list[int]], list[bool]]:
        """``n`` responses per prompt in dataset ids (EOS stripped) and whether each ended."""
        policy = self.policy(index)
        if self.world is not None:
            out = policy.generate(sp.tokens, num_samples=n, seed=seed)
            eos = set(policy.eos_ids)
            ended = [bool(r) and r[-1] in eos for r in out]
            return [r[:-1] if e else r for r, e in zip(out, ended, strict=True)], ended
        out = policy.generate([policy.encode(t) for t in sp.text], num_samples=n, seed=seed)
        ended = [bool(r) and r[-1] in policy.eos_ids for r in out]
        texts = [policy.decode(r) for r in out]
        return [list(self.tokenizer.encode(t, add_special_tokens=False)) for t in texts], ended

    @contextlib.contextmanager
    def single_thread(self):
        """One intra-op thread: results do not depend on the machine's core count, and
        worker processes do not fight over cores."""
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    # ------------------------------------------------------------------ true KL

    def kl_prompts(self) -> list[list[int]] | None:
        """Held-out prompts for the KL matrix, in the policies' tokenizer; None if the pool's
        policies do not share one vocabulary (token-level KL is then undefined)."""
        k = self.args.kl
        if self.world is not None:
            p = self.args.prompts
            prompts, _ = sample_prompts(self.corpus(), k.prompts, p.min_len,
                                        p.max_len, p.max_len, derive_seed(self.seed, "kl"))
            return prompts
        vocabs = {tuple(sorted(self.policy(i).tokenizer.get_vocab().items()))
                  for i in range(len(self.specs))}
        if len(vocabs) != 1:
            return None
        lo, hi = self.args.prompts.train, self.args.prompts.train + self.args.prompts.heldout_prompts
        texts = self._texts[lo:hi][:k.prompts] or self._texts[:k.prompts]
        return [self.policy(0).encode(t) for t in texts]

    def kl_rows_for(self, index: int, prompts) -> list[dict]:
        from polar_scaling.kl import kl_rows_for

        policies = [self.policy(i) for i in range(len(self.specs))]
        return kl_rows_for(policies[index], policies, prompts, self.args.kl.samples_per_prompt,
                           derive_seed(self.seed, "kl-samples", index))

    def kl_rows(self) -> list[dict] | None:
        with self.single_thread():
            prompts = self.kl_prompts()
        if prompts is None:
            return None
        n = len(self.specs)
        if self.args.workers == 1 or n == 1:
            with self.single_thread():
                return [r for i in range(n) for r in self.kl_rows_for(i, prompts)]
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        from polar_scaling.config import to_dict

        with ProcessPoolExecutor(max_workers=min(self.args.workers, n),
                                 mp_context=mp.get_context("spawn"), initializer=init_worker,
                                 initargs=(to_dict(self.args),)) as ex:
            parts = list(ex.map(worker_kl, range(n), [prompts] * n))
        return [r for part in parts for r in part]


# --------------------------------------------------------------------------- worker processes

_RUNTIME: Runtime | None = None


def init_worker(config: dict) -> None:
    import torch

    from polar_scaling.data_generate import GenerateArgs

    global _RUNTIME
    torch.set_num_threads(1)
    _RUNTIME = Runtime(from_dict(GenerateArgs, config))


def worker_shard(run_dir: str, shard: dict) -> dict:
    from polar_scaling.data_generate import write_shard

    return write_shard(_RUNTIME, Path(run_dir), shard)


def worker_kl(index: int, prompts) -> list[dict]:
    return _RUNTIME.kl_rows_for(index, prompts)
