"""The tiny synthetic world the tests share (a dataset in about a second)."""

from __future__ import annotations

from polar_scaling.config import load_config

# A world small enough that a dataset takes about a second: 3 families x 3 members (the last
# member of each held out), 16 content tokens, one layer of width 16.
TINY_WORLD = {
    "content_vocab": 16, "families": 3, "members_per_family": 3,
    "heldout_members_per_family": 1,
    "arch": {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2,
             "max_positions": 64},
}
TINY_GENERATE = {
    "world": TINY_WORLD,
    "prompts": {"train": 16, "heldout_prompts": 6, "heldout_policies": 6,
                "min_len": 2, "max_len": 5},
    "sampling": {"max_new_tokens": 6, "batch_size": 64},
    "shard_prompts": 8,
    "kl": {"prompts": 4, "samples_per_prompt": 2},
    "workers": 1,
    "progress": False,
}


def tiny_args(*overrides: str):
    """GenerateArgs of the tiny world with ``key=value`` overrides."""
    from polar_scaling.data_generate import GenerateArgs

    return load_config(GenerateArgs, None, list(overrides), defaults=TINY_GENERATE)
