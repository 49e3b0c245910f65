"""The InternLM2 -> Llama converter against an independent forward pass of InternLM2.

The test writes tiny checkpoints in the released POLAR layout (packed ``wqkv`` grouped by KV
head, ``tok_embeddings``, ``attention_norm``, ``ffn_norm``, ``feed_forward.w1/w2/w3``,
``v_head``), converts them, and compares the converted RewardModel's scores with
:func:`internlm2_scores`, written here from the architecture's definition (RMSNorm, RoPE with
the checkpoint's theta and scaling, grouped-query causal attention read from the packed
weight, SwiGLU) in float64, with the official padding: left padding, positions counted over
the padded row, score at the last position.
"""

import json
import math
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from polar_scaling.convert_internlm2 import (
    ConversionError,
    convert_internlm2,
    main,
    read_sentencepiece_model,
    split_wqkv,
    tokenizer_from_sentencepiece,
)
from polar_scaling.model import RewardModel
from polar_scaling.scoring import RewardScorer

D, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 64, 2, 4, 2, 96, 128
HEAD_DIM, GROUPS = D // HEADS, HEADS // KV_HEADS
REWARD = "[UNUSED_TOKEN_130]"


# ------------------------------------------------------------------------ fixtures


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=[
        "<unk>", "<s>", "</s>", REWARD])
    text = ["the capital of china is beijing", "count the r letters in strawberry",
            "reward models compare a candidate with a reference answer\n<|reward|>"] * 20
    tok.train_from_iterator(text, trainer)
    return tok


def internlm2_weights(seed, bias=False, head_bias=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.15):
        return torch.randn(*shape, generator=g) * std

    w = {"model.tok_embeddings.weight": rnd(VOCAB, D, std=1.0),
         "model.norm.weight": 1 + rnd(D, std=0.1), "v_head.weight": rnd(1, D, std=0.5)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "attention.wqkv.weight"] = rnd(KV_HEADS * (GROUPS + 2) * HEAD_DIM, D)
        w[p + "attention.wo.weight"] = rnd(D, D)
        w[p + "feed_forward.w1.weight"] = rnd(FFN, D)
        w[p + "feed_forward.w3.weight"] = rnd(FFN, D)
        w[p + "feed_forward.w2.weight"] = rnd(D, FFN)
        w[p + "attention_norm.weight"] = 1 + rnd(D, std=0.1)
        w[p + "ffn_norm.weight"] = 1 + rnd(D, std=0.1)
        if bias:
            w[p + "attention.wqkv.bias"] = rnd(KV_HEADS * (GROUPS + 2) * HEAD_DIM)
            w[p + "attention.wo.bias"] = rnd(D)
    if head_bias:
        w["v_head.bias"] = torch.tensor([0.75])
    return w


def internlm2_config(**over):
    cfg = {
        "architectures": ["InternLM2ForRewardModel"], "model_type": "internlm2",
        "auto_map": {"AutoModel": "modeling_internlm2.InternLM2ForRewardModel"},
        "vocab_size": VOCAB, "hidden_size": D, "intermediate_size": FFN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 50.0, "rope_scaling": None, "bias": False, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False,
    }
    cfg.update(over)
    return cfg


def write_checkpoint(folder, weights, cfg, fmt="safetensors"):
    """An InternLM2 reward-model folder: config, weights in ``fmt``, tokenizer files."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        save_file(weights, str(folder / "model.safetensors"))
    elif fmt == "bin":
        torch.save(weights, folder / "pytorch_model.bin")
    elif fmt == "sharded":
        keys = sorted(weights)
        shards = {"model-00001-of-00002.safetensors": keys[::2],
                  "model-00002-of-00002.safetensors": keys[1::2]}
        for name, ks in shards.items():
            save_file({k: weights[k] for k in ks}, str(folder / name))
        index = {"weight_map": {k: n for n, ks in shards.items() for k in ks}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    tiny_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2TokenizerFast", "add_bos_token": True,
        "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "</s>", "padding_side": "left",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}}))
    return folder


# ------------------------------------------------------- independent InternLM2 forward


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def internlm2_scores(w, cfg, seqs, reward_id):
    """Scores of InternLM2ForRewardModel on token lists (reward token appended), float64."""
    w = {k: v.double() for k, v in w.items()}
    seqs = [s + [reward_id] for s in seqs]
    t = max(map(len, seqs))
    ids = torch.full((len(seqs), t), 2, dtype=torch.long)
    keep = torch.zeros(len(seqs), t, dtype=torch.bool)
    for i, s in enumerate(seqs):  # left padding, as the official tokenizer pads
        ids[i, t - len(s):] = torch.tensor(s)
        keep[i, t - len(s):] = True
    eps, base = cfg["rms_norm_eps"], cfg["rope_theta"]
    pos = torch.arange(t, dtype=torch.float64)
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("type") == "linear":
        pos = pos / scaling["factor"]
    if scaling.get("type") == "dynamic" and t > cfg["max_position_embeddings"]:
        f, m = scaling["factor"], cfg["max_position_embeddings"]
        base = base * ((f * t / m) - (f - 1)) ** (HEAD_DIM / (HEAD_DIM - 2))
    inv = 1.0 / base ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    ang = torch.outer(pos, inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None] & keep[:, None, :]
    x = w["model.tok_embeddings.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "attention_norm.weight"], eps)
        qkv = h @ w[p + "attention.wqkv.weight"].T
        if p + "attention.wqkv.bias" in w:
            qkv = qkv + w[p + "attention.wqkv.bias"]
        qkv = qkv.reshape(len(seqs), t, KV_HEADS, GROUPS + 2, HEAD_DIM)
        out = torch.zeros(len(seqs), t, HEADS, HEAD_DIM, dtype=torch.float64)
        for kv in range(KV_HEADS):
            k = qkv[:, :, kv, GROUPS] * cos + _rotate_half(qkv[:, :, kv, GROUPS]) * sin
            v = qkv[:, :, kv, GROUPS + 1]
            for j in range(GROUPS):  # query head kv * GROUPS + j reads KV head kv
                q = qkv[:, :, kv, j] * cos + _rotate_half(qkv[:, :, kv, j]) * sin
                att = (q @ k.transpose(1, 2)) / math.sqrt(HEAD_DIM)
                att = att.masked_fill(~allowed, -1e30).softmax(-1)
                out[:, :, kv * GROUPS + j] = att @ v
        o = out.reshape(len(seqs), t, D) @ w[p + "attention.wo.weight"].T
        if p + "attention.wo.bias" in w:
            o = o + w[p + "attention.wo.bias"]
        x = x + o
        h = _rms(x, w[p + "ffn_norm.weight"], eps)
        gate = torch.nn.functional.silu(h @ w[p + "feed_forward.w1.weight"].T)
        x = x + (gate * (h @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    x = _rms(x, w["model.norm.weight"], eps)
    scores = x[:, -1] @ w["v_head.weight"][0]
    if "v_head.bias" in w:
        scores = scores + w["v_head.bias"][0]
    return scores


def padded(seqs, reward_id, side):
    seqs = [s + [reward_id] for s in seqs]
    t = max(map(len, seqs))
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(t - len(s), t) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


def token_lists(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


# --------------------------------------------------------------------------- tests


def test_split_wqkv_groups_rows_by_kv_head():
    rows = torch.arange(KV_HEADS * (GROUPS + 2) * HEAD_DIM, dtype=torch.float32)
    q, k, v = split_wqkv(rows, HEADS, KV_HEADS, HEAD_DIM)
    block = (GROUPS + 2) * HEAD_DIM  # rows of one KV group: q heads, then k, then v
    assert q[:HEAD_DIM * GROUPS].tolist() == list(range(HEAD_DIM * GROUPS))
    assert q[HEAD_DIM * GROUPS:].tolist() == list(range(block, block + HEAD_DIM * GROUPS))
    assert k.tolist() == list(range(GROUPS * HEAD_DIM, (GROUPS + 1) * HEAD_DIM)) + list(
        range(block + GROUPS * HEAD_DIM, block + (GROUPS + 1) * HEAD_DIM))
    assert v[-1].item() == rows[-1].item()
    with pytest.raises(ValueError, match="expected 128"):
        split_wqkv(torch.zeros(120, D), HEADS, KV_HEADS, HEAD_DIM)


@pytest.mark.parametrize("variant", [
    dict(fmt="safetensors", cfg={}, weights={}),
    dict(fmt="bin", cfg={"bias": True, "rope_scaling": {"type": "linear", "factor": 2.0}},
         weights={"bias": True}),
    dict(fmt="sharded", cfg={"rope_scaling": {"type": "dynamic", "factor": 2.0},
                             "max_position_embeddings": 16}, weights={}),
], ids=["safetensors", "bin-bias-linear", "sharded-dynamic"])
@torch.no_grad()
def test_converted_scores_match_internlm2_forward(tmp_path, variant):
    cfg = internlm2_config(**variant["cfg"])
    weights = internlm2_weights(seed=len(tmp_path.name), **variant["weights"])
    src = write_checkpoint(tmp_path / "src", weights, cfg, variant["fmt"])
    dst = convert_internlm2(src, tmp_path / "dst")
    rm = RewardModel.from_pretrained(dst).eval()
    reward_id = rm.meta["reward_token_id"]
    assert rm.meta["reward_token"] == REWARD and reward_id == 3
    # Batch lengths straddle max_position_embeddings (16) in the dynamic case.
    seqs = token_lists(5, 3, 24, seed=1)
    expected = internlm2_scores(weights, cfg, seqs, reward_id)
    assert expected.std() > 0.05  # the scores differ between inputs: the test can fail
    dynamic = "dynamic" in json.dumps(variant["cfg"])
    for side in ("left", "right"):
        got = rm(*padded(seqs, reward_id, side)).double()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        if dynamic:  # dynamic NTK depends on the batch's longest row; one batch is enough
            return
    singles = torch.cat([rm(torch.tensor([s + [reward_id]])) for s in seqs]).double()
    single_ref = torch.cat([internlm2_scores(weights, cfg, [s], reward_id) for s in seqs])
    torch.testing.assert_close(singles, single_ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_converted_folder_needs_no_remote_code(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    weights = internlm2_weights(seed=3)
    src = write_checkpoint(tmp_path / "src", weights, internlm2_config())
    dst = convert_internlm2(src, tmp_path / "dst", dtype="float32")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    assert cfg["rope_parameters"]["rope_theta"] == 50.0 and cfg["num_key_value_heads"] == KV_HEADS
    hf = AutoModelForSequenceClassification.from_pretrained(dst).eval()
    tok = AutoTokenizer.from_pretrained(dst)
    ids = tok("the capital of china" + REWARD, return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tok.bos_token_id == 1 and ids[0, -1].item() == 3
    ref = internlm2_scores(weights, internlm2_config(), [ids[0, :-1].tolist()], 3)
    torch.testing.assert_close(hf(ids).logits.squeeze(-1).double(), ref, atol=1e-5, rtol=0)
    # The converted tokenizer splits text exactly as the source tokenizer.json does.
    assert tok("count the r letters", add_special_tokens=False)["input_ids"] == \
        tiny_tokenizer().encode("count the r letters").ids


def official_client_ids(tok, prompt, reference, output):
    """The official client's string (no truncation needed here), tokenized as InternLM2's fast
    tokenizer does: BOS first, the end token a special token."""
    def enc(text):
        return [1] + tok.encode(text, add_special_tokens=False).ids
    p, r, c = (tok.decode(enc(x), skip_special_tokens=True) for x in (prompt, reference, output))
    return enc(p + "\n" + r + "<|reward|>" + p + "\n" + c + REWARD)


@torch.no_grad()
def test_scorer_on_converted_folder_matches_official_pipeline(tmp_path):
    cfg = internlm2_config()
    weights = internlm2_weights(seed=5)
    src = write_checkpoint(tmp_path / "src", weights, cfg)
    scorer = RewardScorer.from_pretrained(convert_internlm2(src, tmp_path / "dst"), batch_size=2)
    items = [{"prompt": "count the r letters in strawberry", "reference": "the answer is 3",
              "output": o} for o in ("the answer is 3", "there are two", "reward", "")]
    items.append({"prompt": [{"role": "user", "content": "the capital of china"}],
                  "reference": [{"role": "assistant", "content": "beijing"}],
                  "output": [{"role": "assistant", "content": "beijing"}]})
    tok = tiny_tokenizer()
    seqs = [official_client_ids(tok, *(x if isinstance(x, str) else x[0]["content"]
                                       for x in (it["prompt"], it["reference"], it["output"])))
            for it in items]
    assert all(s[0] == 1 and s[-1] == 3 and s.count(3) == 1 for s in seqs)
    expected = torch.cat([internlm2_scores(weights, cfg, [s[:-1]], 3) for s in seqs])
    assert expected.std() > 0.05
    torch.testing.assert_close(torch.tensor(scorer(items), dtype=torch.float64), expected,
                               atol=1e-5, rtol=0)


@torch.no_grad()
def test_head_bias_is_refused_or_recorded_as_offset(tmp_path):
    weights = internlm2_weights(seed=4, head_bias=True)
    src = write_checkpoint(tmp_path / "src", weights, internlm2_config())
    with pytest.raises(ConversionError, match=r"v_head has a bias \(0.75\).*--head-bias offset"):
        convert_internlm2(src, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    dst = convert_internlm2(src, tmp_path / "dst", head_bias="offset")
    rm = RewardModel.from_pretrained(dst).eval()
    assert rm.meta["score_offset"] == pytest.approx(0.75)
    seqs = token_lists(3, 3, 10, seed=2)
    got = rm(*padded(seqs, 3, "right")).double() + rm.meta["score_offset"]
    torch.testing.assert_close(got, internlm2_scores(weights, internlm2_config(), seqs, 3),
                               atol=1e-5, rtol=0)


def test_other_architecture_is_a_clear_error(tmp_path):
    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama",
                                                 "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConversionError, match=r"llama/config\.json.*model_type='llama'.*LlamaForCausalLM"):
        convert_internlm2(src, tmp_path / "dst")
    causal = write_checkpoint(tmp_path / "causal", internlm2_weights(0),
                              internlm2_config(architectures=["InternLM2ForCausalLM"]))
    with pytest.raises(ConversionError, match="not a reward model"):
        convert_internlm2(causal, tmp_path / "dst2")


def test_missing_or_foreign_weights_are_clear_errors(tmp_path):
    src = write_checkpoint(tmp_path / "src", internlm2_weights(0), internlm2_config())
    (src / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"has no weights.*config\.json"):
        convert_internlm2(src, tmp_path / "dst")
    extra = internlm2_weights(0)
    extra["model.layers.0.feed_forward.w1.bias"] = torch.zeros(FFN)
    src2 = write_checkpoint(tmp_path / "src2", extra, internlm2_config())
    with pytest.raises(ConversionError, match=r"cannot be represented.*feed_forward\.w1\.bias"):
        convert_internlm2(src2, tmp_path / "dst")
    short = internlm2_weights(0)
    del short["model.layers.1.ffn_norm.weight"]
    src3 = write_checkpoint(tmp_path / "src3", short, internlm2_config())
    with pytest.raises(ConversionError, match=r"model\.safetensors: missing tensor 'model\.layers\.1\.ffn_norm"):
        convert_internlm2(src3, tmp_path / "dst")


def test_unsupported_rope_scaling_is_refused(tmp_path):
    cfg = internlm2_config(rope_scaling={"type": "yarn", "factor": 4.0})
    src = write_checkpoint(tmp_path / "src", internlm2_weights(0), cfg)
    with pytest.raises(ConversionError, match=r"config\.json: rope_scaling type 'yarn'"):
        convert_internlm2(src, tmp_path / "dst")


def test_cli_converts_and_reports_errors(tmp_path, capsys):
    src = write_checkpoint(tmp_path / "src", internlm2_weights(0), internlm2_config())
    assert main([str(src), str(tmp_path / "dst"), "--dtype", "bfloat16"]) == 0
    assert "reward token '[UNUSED_TOKEN_130]' = id 3" in capsys.readouterr().out
    with safe_open(str(tmp_path / "dst" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("score.weight").dtype == torch.bfloat16
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "dst2")]) == 2
    assert "is not a folder" in capsys.readouterr().err


# ------------------------------------------------- sentencepiece tokenizer.model path


def _field(number, wire, payload):
    def varint(n):
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    key = varint(number << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    if wire == 5:
        return key + payload
    return key + varint(len(payload)) + payload


def sentencepiece_model_bytes(pieces):
    """A minimal sentencepiece ModelProto: BPE, byte fallback, dummy prefix."""
    body = b""
    for piece, kind in pieces:
        body += _field(1, 2, _field(1, 2, piece.encode()) + _field(2, 5, struct.pack("<f", 0.0))
                       + _field(3, 0, kind))
    body += _field(2, 2, _field(3, 0, 2) + _field(35, 0, 1) + _field(45, 2, b"<unk>"))
    body += _field(3, 2, _field(1, 2, b"identity") + _field(3, 0, 1))
    return body


def test_sentencepiece_model_converts_to_the_same_bpe(tmp_path):
    pieces = [("<unk>", 2), ("<s>", 3), ("</s>", 3)] + [(f"<0x{b:02X}>", 6) for b in range(256)]
    # Merge order follows piece order: "bc" (earlier) beats "ab" on "abc".
    pieces += [("▁", 1), ("a", 1), ("b", 1), ("c", 1), ("bc", 1), ("ab", 1), ("▁a", 1),
               ("▁abc", 1), ("[UNUSED_TOKEN_130]", 4)]
    path = tmp_path / "tokenizer.model"
    path.write_bytes(sentencepiece_model_bytes(pieces))
    model = read_sentencepiece_model(path)
    assert model["model_type"] == 2 and model["byte_fallback"] and model["add_dummy_prefix"]
    assert model["pieces"][261] == ("b", 0.0, 1)
    added = {1: {"content": "<s>", "special": True}, 267: {"content": REWARD, "special": True}}
    tok = tokenizer_from_sentencepiece(path, added)
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    assert tok.encode("abc").tokens == ["▁abc"]  # "ab" before "bc" would give ▁ ab c
    assert tok.encode("ab d").ids == [vocab["▁"], vocab["ab"], vocab["▁"], 3 + ord("d")]
    assert tok.encode("abc" + REWARD).ids[-1] == 267
    assert tok.decode(tok.encode("ab d").ids) == "ab d"
