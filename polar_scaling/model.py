"""RewardModel: an HF decoder backbone plus a bias-free linear head read at one position.

The score of a sequence is ``head(h[t])`` where ``t`` is the sequence's last attention-mask
position (its reward token), so left-, right- and mixed-padded batches give the same scores;
packed rows pass explicit ``score_index`` positions instead.

On disk a reward model is the ``LlamaForSequenceClassification`` layout with one label
(``model.*`` backbone weights and ``score.weight``) in safetensors, so
``AutoModelForSequenceClassification.from_pretrained`` can read it too. ``polar.json``
beside it records the reward token and where the model came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

REWARD_META = "polar.json"
WEIGHTS = "model.safetensors"


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, meta: dict | None = None):
        super().__init__()
        self.model = backbone
        self.config = backbone.config
        self.score = nn.Linear(self.config.hidden_size, 1, bias=False)
        # Small head init keeps initial rewards near 0, so the BT loss starts at ln 2.
        nn.init.normal_(self.score.weight, std=1.0 / self.config.hidden_size)
        self.meta = dict(meta or {})

    # ----------------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, config, meta: dict | None = None, dtype=None) -> RewardModel:
        """A randomly initialised reward model for a transformers config (no hub access)."""
        from transformers import AutoModel

        backbone = AutoModel.from_config(config, dtype=dtype or torch.float32)
        return cls(backbone, meta)

    @classmethod
    def from_base(cls, path: str | Path, meta: dict | None = None,
                  trust_remote_code: bool = False, dtype=None) -> RewardModel:
        """Backbone from a local pre-trained LM folder (its LM head dropped), new reward head."""
        from transformers import AutoModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"base model folder {path} has no config.json")
        from transformers.utils import logging as hf_logging

        # The LM head is dropped on purpose; keep transformers from reporting it as unexpected.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            backbone = AutoModel.from_pretrained(path, dtype=dtype or torch.float32,
                                                 trust_remote_code=trust_remote_code)
        finally:
            hf_logging.set_verbosity(verbosity)
        return cls(backbone, {**(meta or {}), "base": str(path)})

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype=None) -> RewardModel:
        """Load a reward model saved by :meth:`save_pretrained` (head included)."""
        from transformers import AutoConfig

        path = Path(path)
        if not (path / WEIGHTS).is_file() or not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a reward model folder "
                                    f"(needs config.json and {WEIGHTS})")
        config = AutoConfig.from_pretrained(path)
        meta = json.loads((path / REWARD_META).read_text()) if (path / REWARD_META).is_file() else {}
        model = cls.from_config(config, meta, dtype=dtype)
        state = load_file(str(path / WEIGHTS))
        if "score.weight" not in state:
            raise ValueError(f"{path / WEIGHTS} has no reward head (score.weight): not a reward model")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match the config "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None) -> None:
        """Write config.json, model.safetensors (head included) and polar.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.config
        config.architectures = ["LlamaForSequenceClassification"]
        config.num_labels = 1
        config.save_pretrained(path)
        state = state_dict if state_dict is not None else self.state_dict()
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(state, str(path / WEIGHTS), metadata={"format": "pt"})
        (path / REWARD_META).write_text(json.dumps(self.meta, indent=2, default=str))

    # ----------------------------------------------------------------------------- forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                score_index: torch.Tensor | None = None) -> torch.Tensor:
        """Scores, one per sequence.

        Padded batch ``[B, T]``: the score is read at each row's last mask position and
        positions count real tokens only (so left and right padding agree exactly).
        Packed rows: pass ``position_ids`` restarting at 0 for each sequence and
        ``score_index`` as flat indices into ``B*T``; attention stays within sequences.
        """
        if score_index is None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            last = (attention_mask.long() * positions).argmax(dim=-1)
            score_index = last + positions.new_tensor(input_ids.shape[1]) * torch.arange(
                input_ids.shape[0], device=input_ids.device)
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=False).last_hidden_state
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, score_index)
        return self.score(picked.to(self.score.weight.dtype)).squeeze(-1).float()


def save_causal_lm(module, path: str | Path, state_dict: dict) -> None:
    """``module.save_pretrained`` with the full-precision ``state_dict`` (safetensors), and
    ``config.json``'s ``dtype`` set to that of the weights written: transformers records the
    module's own dtype (bf16 under DeepSpeed's bf16) and loads a folder in it by default."""
    dtypes = {v.dtype for v in state_dict.values() if v.is_floating_point()}
    module.save_pretrained(path, state_dict=state_dict, safe_serialization=True)  # empties it
    if len(dtypes) == 1:
        config_path = Path(path) / "config.json"
        config = json.loads(config_path.read_text())
        config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
