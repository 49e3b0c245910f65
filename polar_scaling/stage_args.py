"""Config pieces shared by the training stages (model choice, budget, batch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from polar_scaling.config import check


@dataclass
class ModelArgs:
    size: str = "t100k"  # a ladder name (polar_scaling.sizes)
    # A local HF folder to start from (a base LM from `polar-train lm`, or a converted
    # checkpoint); None starts from random weights.
    base: str | None = None
    trust_remote_code: bool = False


@dataclass
class BudgetArgs:
    """Training length: exactly one of tokens or FLOPs (cumulative training compute)."""

    tokens: float | None = field(default=None, metadata={"gt": 0})
    flops: float | None = field(default=None, metadata={"gt": 0})

    def __post_init__(self):
        check((self.tokens is None) != (self.flops is None), "tokens",
              "give exactly one of budget.tokens and budget.flops")


@dataclass
class BatchArgs:
    size: int = field(default=32, metadata={"ge": 1})  # examples per optimizer step, all ranks
    micro: int | None = field(default=None, metadata={"ge": 1})  # per rank; None: size/world
