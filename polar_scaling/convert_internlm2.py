"""Convert a released InternLM2 reward model (the POLAR layout) into a RewardModel folder.

Source: a folder with ``config.json`` (InternLM2 keys, ``InternLM2ForRewardModel``), weights
(``model.safetensors``, sharded safetensors with an index, or ``pytorch_model*.bin``) and the
tokenizer files (``tokenizer.json`` or the sentencepiece ``tokenizer.model``, with
``tokenizer_config.json``). Destination: the Llama sequence-classification layout that
:class:`polar_scaling.model.RewardModel` and transformers read natively (no remote code), plus
a fast tokenizer and ``polar.json`` naming the reward token and ``"encoding": "text"``, which
makes :mod:`polar_scaling.scoring` build inputs exactly as the official POLAR client does.

Weight mapping (InternLM2 -> Llama):

* ``tok_embeddings`` -> ``embed_tokens``; ``attention_norm`` -> ``input_layernorm``;
  ``ffn_norm`` -> ``post_attention_layernorm``; ``attention.wo`` -> ``self_attn.o_proj``;
  ``feed_forward.w1/w3/w2`` -> ``mlp.gate_proj/up_proj/down_proj``; ``v_head`` -> ``score``.
* ``attention.wqkv`` is packed per KV head: rows are ``[kv_heads, q_per_kv + 2, head_dim]``
  where, inside each KV group, the first ``q_per_kv`` blocks are that group's query heads,
  then one key head, then one value head. Query head ``h * q_per_kv + j`` reads KV head
  ``h``, which is exactly Llama's ``repeat_kv`` order, so no head permutation is needed.
  Both use the rotate-half RoPE convention, so q/k rows are not permuted either.

CLI::

    python -m polar_scaling.convert_internlm2 SRC DST [--dtype auto|float32|bfloat16|float16]
        [--reward-token TOKEN] [--head-bias refuse|offset]
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import torch

from polar_scaling.model import REWARD_META, WEIGHTS, RewardModel

# The token the official POLAR client appends to every input ([UNUSED_TOKEN_130], id 92527
# in the InternLM2 vocabulary); used when neither the caller nor config.json names one.
POLAR_REWARD_TOKEN = "[UNUSED_TOKEN_130]"
SUPPORTED_ROPE_SCALING = ("linear", "dynamic")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(ValueError):
    """The source folder cannot be converted; the message names the file and the cause."""


# ------------------------------------------------------------------------------- config


def read_internlm2_config(src: Path) -> dict:
    """The source ``config.json`` as a dict, checked to describe an InternLM2 reward model."""
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src} has no config.json: not a model folder")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if model_type != "internlm2" and not any(str(a).startswith("InternLM2") for a in archs):
        raise ConversionError(
            f"{path}: expected an InternLM2 reward model (model_type 'internlm2', architecture "
            f"InternLM2ForRewardModel), found model_type={model_type!r}, architectures={archs}")
    if archs and "InternLM2ForRewardModel" not in archs:
        raise ConversionError(
            f"{path}: architectures {archs} is not a reward model; only InternLM2ForRewardModel "
            f"(a backbone plus v_head) can be converted")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                "vocab_size"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise ConversionError(f"{path}: {key} must be a positive integer, got {cfg.get(key)!r}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported "
                              f"(InternLM2 and Llama use silu)")
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if cfg["hidden_size"] % heads or heads % kv:
        raise ConversionError(f"{path}: hidden_size {cfg['hidden_size']}, num_attention_heads "
                              f"{heads} and num_key_value_heads {kv} do not divide evenly")
    return cfg


def rope_parameters(cfg: dict, path: Path) -> dict:
    """Llama ``rope_parameters`` equal to the checkpoint's RoPE (theta and optional scaling).

    InternLM2's "dynamic" (NTK) and "linear" scaling use the same formulas as transformers'
    Llama types of those names; any other scaling type is refused.
    """
    params = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    scaling = cfg.get("rope_scaling")
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")
        if kind not in SUPPORTED_ROPE_SCALING:
            raise ConversionError(
                f"{path}: rope_scaling type {kind!r} is not supported (Llama-compatible InternLM2 "
                f"scaling types: {', '.join(SUPPORTED_ROPE_SCALING)})")
        factor = scaling.get("factor")
        if not isinstance(factor, (int, float)) or factor < 1.0:
            raise ConversionError(f"{path}: rope_scaling factor must be a number >= 1, got {factor!r}")
        params.update(rope_type=kind, factor=float(factor))
    return params


def llama_config(cfg: dict, path: Path, attention_bias: bool, tokenizer=None):
    """A transformers ``LlamaConfig`` with the same shapes, norms and RoPE as ``cfg``."""
    from transformers import LlamaConfig

    heads = cfg["num_attention_heads"]
    special = {}
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = cfg.get(name)
        if value is None and tokenizer is not None:
            value = getattr(tokenizer, name, None)
        special[name] = value
    return LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg["hidden_size"] // heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_parameters=rope_parameters(cfg, path), hidden_act="silu",
        attention_bias=attention_bias, mlp_bias=False, tie_word_embeddings=False, **special,
    )


# ------------------------------------------------------------------------------ weights


def find_weight_files(src: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors preferred, ``.bin`` otherwise."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index}: not a weight index ({e})") from None
            missing = [s for s in shards if not (src / s).is_file()]
            if missing:
                raise ConversionError(f"{index} lists shards that are not in {src}: {missing}")
            return [src / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (src / single).is_file():
            return [src / single]
    found = sorted(src.glob("*.safetensors")) or sorted(
        p for p in src.glob("*.bin") if p.name != "training_args.bin")
    if found:
        return found
    listing = sorted(p.name for p in src.iterdir())
    raise ConversionError(
        f"{src} has no weights (expected model.safetensors, model.safetensors.index.json, "
        f"pytorch_model.bin or their shards); found {listing}")


def load_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint; ``.bin`` files load with ``weights_only=True``."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            part = load_file(str(f))
        else:
            try:
                part = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # pickle errors name neither the file nor the cause
                raise ConversionError(f"{f}: cannot load as plain tensors ({e})") from None
            if not isinstance(part, dict):
                raise ConversionError(f"{f}: expected a state dict, found {type(part).__name__}")
        state.update(part)
    return state


def split_wqkv(packed: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """Split a packed InternLM2 ``wqkv`` weight ``[out, d]`` (or bias ``[out]``) into q, k, v.

    Rows are grouped by KV head: ``[kv_heads, heads // kv_heads + 2, head_dim]``.
    """
    groups = heads // kv_heads
    rows = kv_heads * (groups + 2) * head_dim
    if packed.shape[0] != rows:
        raise ValueError(f"wqkv has {packed.shape[0]} rows, expected {rows} "
                         f"= kv_heads {kv_heads} * (q_per_kv {groups} + 2) * head_dim {head_dim}")
    tail = packed.shape[1:]
    grouped = packed.reshape(kv_heads, groups + 2, head_dim, *tail)
    q = grouped[:, :groups].reshape(heads * head_dim, *tail)
    k = grouped[:, groups].reshape(kv_heads * head_dim, *tail)
    v = grouped[:, groups + 1].reshape(kv_heads * head_dim, *tail)
    return q.contiguous(), k.contiguous(), v.contiguous()


# Per-layer InternLM2 names -> Llama names, for tensors that map one to one.
_LAYER_RENAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wo.bias": "self_attn.o_proj.bias",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def convert_state_dict(state: dict, cfg: dict, where: str, head_bias: str = "refuse"):
    """Llama-layout tensors for a RewardModel, and notes for ``polar.json``.

    ``where`` names the weight files in errors. A ``v_head`` bias cannot live in the bias-free
    score head: ``head_bias="refuse"`` raises; ``"offset"`` drops it and returns it as
    ``score_offset`` (a constant shift that leaves every score difference unchanged).
    """
    if head_bias not in ("refuse", "offset"):
        raise ValueError(f"head_bias must be 'refuse' or 'offset', got {head_bias!r}")
    # Some exports omit the "model." prefix of the backbone; accept both.
    state = {(k if k.startswith(("model.", "v_head.")) or k == "output.weight" else f"model.{k}"): v
             for k, v in state.items()}
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg["hidden_size"] // heads
    out, notes, used = {}, {}, set()

    def take(key):
        if key not in state:
            raise ConversionError(f"{where}: missing tensor {key!r} (an InternLM2 reward model "
                                  f"with {layers} layers needs it)")
        used.add(key)
        return state[key]

    out["model.embed_tokens.weight"] = take("model.tok_embeddings.weight")
    out["model.norm.weight"] = take("model.norm.weight")
    bias = "model.layers.0.attention.wqkv.bias" in state
    declared = cfg.get("bias")
    if declared is not None and bool(declared) != bias:
        raise ConversionError(f"{where}: config.json says bias={declared} but the weights "
                              f"{'have' if bias else 'lack'} attention biases")
    for i in range(layers):
        p = f"model.layers.{i}."
        try:
            q, k, v = split_wqkv(take(p + "attention.wqkv.weight"), heads, kv_heads, head_dim)
        except ValueError as e:
            raise ConversionError(f"{where}: {p}attention.wqkv.weight: {e}") from None
        out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"] = q, k
        out[p + "self_attn.v_proj.weight"] = v
        if bias:
            qb, kb, vb = split_wqkv(take(p + "attention.wqkv.bias"), heads, kv_heads, head_dim)
            out[p + "self_attn.q_proj.bias"], out[p + "self_attn.k_proj.bias"] = qb, kb
            out[p + "self_attn.v_proj.bias"] = vb
        for src_name, dst_name in _LAYER_RENAMES.items():
            if src_name == "attention.wo.bias" and not bias:
                continue
            out[p + dst_name] = take(p + src_name)

    head = take("v_head.weight")
    if head.dim() != 2 or head.shape != (1, cfg["hidden_size"]):
        raise ConversionError(f"{where}: v_head.weight has shape {tuple(head.shape)}, expected "
                              f"(1, {cfg['hidden_size']}): a scalar reward head")
    out["score.weight"] = head
    if "v_head.bias" in state:
        used.add("v_head.bias")
        value = float(state["v_head.bias"].reshape(-1)[0])
        if head_bias == "refuse":
            raise ConversionError(
                f"{where}: v_head has a bias ({value:.6g}) that the bias-free score head cannot "
                f"represent; convert with head_bias='offset' (--head-bias offset) to record it as "
                f"score_offset in {REWARD_META} (scores shift by a constant, differences do not)")
        notes["score_offset"] = value

    # Buffers and an LM head are not weights of the reward model; drop them, say so.
    dropped = sorted(k for k in state if k not in used
                     and (k.endswith("rotary_emb.inv_freq") or k == "output.weight"))
    if dropped:
        notes["dropped_tensors"] = dropped if len(dropped) < 8 else dropped[:3] + ["..."]
    unknown = sorted(k for k in state if k not in used and k not in set(dropped))
    if unknown:
        raise ConversionError(f"{where}: tensors with no Llama counterpart (cannot be "
                              f"represented): {unknown[:6]}{' ...' if len(unknown) > 6 else ''}")
    return out, notes


# ---------------------------------------------------------------------------- tokenizer


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> list[tuple[int, int, object]]:
    """(field number, wire type, value) of one protobuf message; bytes for length-delimited."""
    fields, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.append((number, wire, value))
    return fields


def read_sentencepiece_model(path: Path) -> dict:
    """The parts of a sentencepiece ``ModelProto`` a BPE tokenizer needs, without sentencepiece.

    Returns ``pieces`` [(piece, score, type)], ``model_type`` (1 unigram, 2 BPE),
    ``byte_fallback``, ``unk_piece`` and ``add_dummy_prefix`` (field numbers from
    sentencepiece_model.proto).
    """
    try:
        top = _proto_fields(path.read_bytes())
    except (IndexError, ValueError) as e:
        raise ConversionError(f"{path}: not a sentencepiece model ({e})") from None
    model = {"pieces": [], "model_type": 1, "byte_fallback": False, "unk_piece": "<unk>",
             "add_dummy_prefix": True}
    for number, _, value in top:
        if number == 1:
            piece, score, kind = "", 0.0, 1
            for n, _, v in _proto_fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            model["pieces"].append((piece, score, kind))
        elif number == 2:
            for n, _, v in _proto_fields(value):
                if n == 3:
                    model["model_type"] = v
                elif n == 35:
                    model["byte_fallback"] = bool(v)
                elif n == 45:
                    model["unk_piece"] = v.decode("utf-8")
        elif number == 3:
            for n, _, v in _proto_fields(value):
                if n == 3:
                    model["add_dummy_prefix"] = bool(v)
    if not model["pieces"]:
        raise ConversionError(f"{path}: sentencepiece model has no pieces")
    return model


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    # Sentencepiece BPE ranks a merge by the id of the piece it makes (lower id = earlier);
    # every split of a piece into two known pieces is a candidate merge.
    merges = []
    for piece, rank in vocab.items():
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((rank, lr) for lr in local)
    merges.sort(key=lambda m: m[0])
    return [lr for _, lr in merges]


def tokenizer_from_sentencepiece(path: Path, added: dict[int, dict]):
    """A ``tokenizers.Tokenizer`` equal to InternLM2's fast tokenizer for this ``tokenizer.model``.

    Byte-fallback BPE over the sentencepiece pieces; whitespace becomes "▁" with a "▁" prepended
    when the model adds a dummy prefix; ids of ``added`` (``added_tokens_decoder``) take their
    configured text and match as whole tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    sp = read_sentencepiece_model(path)
    if sp["model_type"] != 2:
        raise ConversionError(f"{path}: sentencepiece model type {sp['model_type']} is not BPE "
                              f"(InternLM2 tokenizers are BPE, type 2)")
    names = [p for p, _, _ in sp["pieces"]]
    for i, tok in added.items():
        if i < len(names):
            names[i] = tok["content"]
    vocab = {}
    for i, name in enumerate(names):
        vocab.setdefault(name, i)
    tok = Tokenizer(BPE(vocab, _bpe_merges(vocab), unk_token=sp["unk_piece"], fuse_unk=True,
                        byte_fallback=sp["byte_fallback"]))
    steps = [normalizers.Prepend("▁")] if sp["add_dummy_prefix"] else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([
        AddedToken(t["content"], special=t.get("special", True), lstrip=t.get("lstrip", False),
                   rstrip=t.get("rstrip", False), normalized=t.get("normalized", False),
                   single_word=t.get("single_word", False))
        for _, t in sorted(added.items())])
    return tok


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def convert_tokenizer(src: Path, reward_token: str | None, config_reward_id: int | None):
    """The source tokenizer as a ``PreTrainedTokenizerFast`` (no remote code) and its reward token.

    InternLM2 tokenizer classes add BOS (``add_bos_token``, default true) and no EOS, as their
    fast class does at load time. The reward token is, in order: ``reward_token``, the token of
    config.json's ``reward_token_id``, or POLAR's ``[UNUSED_TOKEN_130]``; it is made a special
    token so it always encodes to its single id.
    """
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tc_path = src / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    stm_path = src / "special_tokens_map.json"
    stm = json.loads(stm_path.read_text()) if stm_path.is_file() else {}
    added = {int(i): t for i, t in (tc.get("added_tokens_decoder") or {}).items()}
    if (src / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(src / "tokenizer.json"))
        origin = "tokenizer.json"
    elif (src / "tokenizer.model").is_file():
        tok = tokenizer_from_sentencepiece(src / "tokenizer.model", added)
        origin = "tokenizer.model"
    else:
        raise ConversionError(f"{src} has no tokenizer (expected tokenizer.json or the "
                              f"sentencepiece tokenizer.model)")

    specials = {}
    for name, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"),
                          ("pad_token", None)):
        text = _token_text(tc.get(name)) or _token_text(stm.get(name)) or default
        if text is not None and tok.token_to_id(text) is not None:
            specials[name] = text
    is_internlm2 = str(tc.get("tokenizer_class", "")).startswith("InternLM2Tokenizer")
    if is_internlm2 or origin == "tokenizer.model":
        add_bos, add_eos = tc.get("add_bos_token", True), tc.get("add_eos_token", False)
        single, pairs, ids = "$A:0", "$A:0 $B:1", []
        if add_bos and "bos_token" in specials:
            b = specials["bos_token"]
            single, pairs = f"{b}:0 {single}", f"{b}:0 $A:0 {b}:1 $B:1"
            ids.append((b, tok.token_to_id(b)))
        if add_eos and "eos_token" in specials:
            e = specials["eos_token"]
            single, pairs = f"{single} {e}:0", f"{pairs} {e}:1"
            ids.append((e, tok.token_to_id(e)))
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pairs,
                                                           special_tokens=ids)

    if reward_token is None and config_reward_id is not None:
        reward_token = tok.id_to_token(int(config_reward_id))
        if reward_token is None:
            raise ConversionError(f"{src / 'config.json'}: reward_token_id {config_reward_id} "
                                  f"is outside the tokenizer's vocabulary")
    if reward_token is None:
        reward_token = POLAR_REWARD_TOKEN
    reward_id = tok.token_to_id(reward_token)
    if reward_id is None:
        raise ConversionError(f"{src}/{origin}: the reward token {reward_token!r} is not in the "
                              f"vocabulary; name it with --reward-token")
    tok.add_special_tokens([AddedToken(reward_token, special=True, normalized=False)])
    if tok.token_to_id(reward_token) != reward_id:
        raise ConversionError(f"{src}/{origin}: the reward token {reward_token!r} did not keep "
                              f"its id {reward_id}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, padding_side=tc.get("padding_side", "left"),
        model_max_length=tc.get("model_max_length", int(1e30)),
        clean_up_tokenization_spaces=tc.get("clean_up_tokenization_spaces", False), **specials)
    if tc.get("chat_template"):
        fast.chat_template = tc["chat_template"]
    return fast, reward_token, reward_id, origin


# ------------------------------------------------------------------------------- driver


def convert_internlm2(src: str | Path, dst: str | Path, dtype: str = "auto",
                      reward_token: str | None = None, head_bias: str = "refuse") -> Path:
    """Convert the InternLM2 reward model in ``src`` into a RewardModel folder ``dst``.

    ``dst`` then loads with :meth:`RewardModel.from_pretrained` and
    ``AutoModelForSequenceClassification`` (no remote code) and holds the converted fast
    tokenizer. ``polar.json`` records the reward token, its id, the source and any
    ``score_offset`` (see :func:`convert_state_dict`). ``dtype="auto"`` keeps the checkpoint's
    floating-point type. Errors are :class:`ConversionError` naming the file and the cause.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConversionError(f"{src} is not a folder")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {list(DTYPES)}, got {dtype!r}")
    cfg = read_internlm2_config(src)
    # Tokenizer first: a folder without one fails before the (large) weights are read.
    tokenizer, reward_token, reward_id, tok_origin = convert_tokenizer(
        src, reward_token, cfg.get("reward_token_id"))
    if tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True) > cfg["vocab_size"]:
        raise ConversionError(
            f"{src}/{tok_origin}: the tokenizer has "
            f"{tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True)} tokens, more "
            f"than config.json's vocab_size {cfg['vocab_size']}")
    files = find_weight_files(src)
    where = ", ".join(str(f) for f in files[:2]) + (" ..." if len(files) > 2 else "")
    state, notes = convert_state_dict(load_weights(files), cfg, where, head_bias)

    if dtype == "auto":
        target = state["model.layers.0.self_attn.q_proj.weight"].dtype
    else:
        target = DTYPES[dtype]
    state = {k: v.to(target) for k, v in state.items()}
    bias = "model.layers.0.self_attn.q_proj.bias" in state
    config = llama_config(cfg, src / "config.json", bias, tokenizer)
    meta = {
        # "text": score with the official client's whole-text encoding (polar_scaling.scoring).
        "reward_token": reward_token, "reward_token_id": reward_id, "encoding": "text",
        "source": {"path": str(src.resolve()), "architecture": "InternLM2ForRewardModel",
                   "weights": [f.name for f in files], "tokenizer": tok_origin},
        **notes,
    }
    # Built on the meta device and filled by assignment: no random init, no second copy.
    with torch.device("meta"):
        rm = RewardModel.from_config(config, meta, dtype=target)
    missing, unexpected = rm.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ConversionError(f"{where}: converted tensors do not fit a Llama reward model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    rm.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m polar_scaling.convert_internlm2",
        description="Convert a released InternLM2/POLAR reward model folder into a RewardModel "
                    "folder (Llama layout, fast tokenizer, polar.json).")
    parser.add_argument("src", help="InternLM2 reward model folder (config.json, weights, tokenizer)")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="weight type of the output (auto: as in the checkpoint)")
    parser.add_argument("--reward-token", default=None,
                        help=f"token read for the score (default: config reward_token_id, "
                             f"else {POLAR_REWARD_TOKEN})")
    parser.add_argument("--head-bias", default="refuse", choices=["refuse", "offset"],
                        help="a v_head bias: refuse, or record it as score_offset in polar.json")
    args = parser.parse_args(argv)
    try:
        out = convert_internlm2(args.src, args.dst, args.dtype, args.reward_token, args.head_bias)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = json.loads((out / REWARD_META).read_text())
    print(f"wrote {out / WEIGHTS}, config.json, tokenizer and {REWARD_META} "
          f"(reward token {meta['reward_token']!r} = id {meta['reward_token_id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
