"""The scoring API: same ids as training / the official client, order kept, clear errors."""

import random

import pytest
import torch

from polar_scaling.model import RewardModel
from polar_scaling.scoring import (
    RewardScorer,
    encode_items,
    length_sorted_batches,
    parse_items,
    score,
)
from polar_scaling.sizes import get_size, hf_config
from polar_scaling.template import encode_polar_text
from polar_scaling.tokenizer import build_world_tokenizer, content_char

END = "[UNUSED_TOKEN_130]"


def tiny_model(vocab, pad, meta, seed=0):
    torch.manual_seed(seed)
    rm = RewardModel.from_config(hf_config(get_size("t25k").with_vocab(vocab), pad_token_id=pad),
                                 meta)
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    return rm.eval()


@pytest.fixture(scope="module")
def native():
    """A model of this suite with the world tokenizer (the "ids" encoding)."""
    tok = build_world_tokenizer(40)
    return tiny_model(len(tok), tok.pad_token_id, {"reward_token_id": 4}), tok


@pytest.fixture(scope="module")
def converted():
    """A model whose meta says "text", with a BPE tokenizer that adds BOS, like InternLM2's."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(
        ["the capital of china is beijing <|reward|>", "count the letters in strawberry",
         "system: judge by helpfulness and accuracy\nthe answer"] * 10,
        trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>", END]))
    backend.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])
    backend.add_special_tokens([AddedToken(END, special=True, normalized=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="</s>", padding_side="left")
    meta = {"encoding": "text", "reward_token": END, "reward_token_id": 3}
    return tiny_model(128, 2, meta, seed=1), tok


def world_text(rng, n):
    return "".join(content_char(rng.randrange(34)) for _ in range(n))


def world_items(n, seed=0):
    rng = random.Random(seed)
    return [{"prompt": world_text(rng, rng.randint(1, 12)),
             "reference": world_text(rng, rng.randint(1, 30)),
             "output": world_text(rng, rng.randint(0, 30))} for _ in range(n)]


WORDS = "the capital of china is beijing count letters in strawberry".split()


def text_items(n, seed=0):
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))
    return [{"prompt": words(rng.randint(1, 6)), "reference": words(rng.randint(1, 12)),
             "output": words(rng.randint(1, 12))} for _ in range(n)]


def client_ids(tok, p, r, c, wrapper="sft", max_length=16384, max_response_length=4096):
    """The official RewardModelClient._encode, then tokenization of its string."""
    p_ids, r_ids, c_ids = (tok.encode(x, add_special_tokens=True) for x in (p, r, c))
    max_length -= 4
    if len(r_ids) > max_response_length:
        r_ids = r_ids[-max_response_length:]
    if len(c_ids) > max_response_length:
        c_ids = c_ids[-max_response_length:]
    max_prompt_length = (max_length - len(r_ids) - len(c_ids)) // 2
    if len(p_ids) > max_prompt_length:
        p_ids = p_ids[-max_prompt_length:]
    p, r, c = (tok.decode(x, skip_special_tokens=True) for x in (p_ids, r_ids, c_ids))
    ref = p + r if wrapper == "pretrain" else p + "\n" + r
    out = p + c if wrapper == "pretrain" else p + "\n" + c
    return tok.encode(ref + "<|reward|>" + out + END, add_special_tokens=True)


@torch.no_grad()
def plain_forward(model, seqs):
    """One left-padded batch in input order: no sorting, no scoring code involved."""
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], mask[i, width - len(s):] = torch.tensor(s), 1
    return model(ids, mask).tolist()


def test_ids_scores_equal_plain_forward_in_input_order(native):
    model, tok = native
    items = world_items(9)
    seqs = [encode_polar_text(tok, it["prompt"], it["reference"], it["output"]) for it in items]
    assert encode_items(items, tok, "ids", 4) == seqs
    expected = plain_forward(model, seqs)
    got = score(items, model, tok, batch_size=2)
    assert got == pytest.approx(expected, abs=1e-5)
    assert max(expected) - min(expected) > 0.1  # distinct scores: a reordering would show
    # Sorting by length really reorders here, and the output order still follows the input.
    batches = length_sorted_batches(list(map(len, seqs)), 2)
    assert [i for b in batches for i in b] != list(range(len(items)))
    assert score(items[::-1], model, tok, batch_size=4) == pytest.approx(got[::-1], abs=1e-5)


def test_ids_truncation_follows_the_training_template(native):
    model, tok = native
    items = world_items(4, seed=3)
    seqs = encode_items(items, tok, "ids", 4, max_length=24, max_response_length=6)
    assert seqs == [encode_polar_text(tok, it["prompt"], it["reference"], it["output"],
                                      max_length=24, max_response_length=6) for it in items]
    assert max(map(len, seqs)) <= 24
    got = score(items, model, tok, max_length=24, max_response_length=6)
    assert got == pytest.approx(plain_forward(model, seqs), abs=1e-5)


def test_text_encoding_is_the_official_client_string(converted):
    model, tok = converted
    items = text_items(6)
    assert encode_items(items, tok, "text", 3) == [
        client_ids(tok, it["prompt"], it["reference"], it["output"]) for it in items]
    pre = [{**it, "wrapper": "pretrain"} for it in items]
    assert encode_items(pre, tok, "text", 3) == [
        client_ids(tok, it["prompt"], it["reference"], it["output"], "pretrain") for it in items]
    # Truncated: responses keep their last tokens, the prompt its last (budget) tokens.
    cut = encode_items(items, tok, "text", 3, max_length=24, max_response_length=5)
    assert cut == [client_ids(tok, it["prompt"], it["reference"], it["output"], "sft", 24, 5)
                   for it in items]
    assert cut != encode_items(items, tok, "text", 3)


def test_text_scores_equal_plain_forward(converted):
    model, tok = converted
    items = text_items(7, seed=1)
    seqs = [client_ids(tok, it["prompt"], it["reference"], it["output"]) for it in items]
    expected = plain_forward(model, seqs)
    assert max(expected) - min(expected) > 0.1
    assert score(items, model, tok, batch_size=3) == pytest.approx(expected, abs=1e-5)


def test_messages_are_joined_by_newlines(native, converted):
    for model, tok, items, enc in ((*native, world_items(3), "ids"),
                                   (*converted, text_items(3), "text")):
        as_messages = [{
            "prompt": [{"role": "system", "content": it["prompt"][:1]},
                       {"role": "user", "content": it["prompt"][1:]}],
            "reference": [{"role": "assistant", "content": it["reference"]}],
            "output": [{"role": "assistant", "content": it["output"]}]} for it in items]
        joined = [{**it, "prompt": it["prompt"][:1] + "\n" + it["prompt"][1:]} for it in items]
        rid = model.meta["reward_token_id"]
        assert encode_items(as_messages, tok, enc, rid) == encode_items(joined, tok, enc, rid)
        assert score(as_messages, model, tok) == pytest.approx(score(joined, model, tok), abs=1e-6)
        assert encode_items(joined, tok, enc, rid) != encode_items(items, tok, enc, rid)


def test_wrapper_drops_the_two_newlines(native):
    model, tok = native
    items = world_items(4, seed=5)
    sft = encode_items(items, tok, "ids", 4)
    pre = encode_items([{**it, "wrapper": "pretrain"} for it in items], tok, "ids", 4)
    newline = tok.encode("\n", add_special_tokens=False)
    assert newline == [5]
    for s, p in zip(sft, pre, strict=True):
        assert len(s) == len(p) + 2 and [t for t in s if t != 5] == [t for t in p if t != 5]
    diff = [a - b for a, b in zip(score(items, model, tok),
                                  score([{**it, "wrapper": "pretrain"} for it in items], model, tok),
                                  strict=True)]
    assert max(map(abs, diff)) > 1e-3


def test_system_prompt_goes_first_and_changes_scores(native, converted):
    model, tok = native
    items = world_items(3, seed=6)
    system = content_char(0) * 3
    plain = encode_items(items, tok, "ids", 4)
    cond = encode_items([{**it, "system": system} for it in items], tok, "ids", 4)
    head = tok.encode(system + "\n", add_special_tokens=False)
    assert all(c == head + p for c, p in zip(cond, plain, strict=True))
    s0, s1 = score(items, model, tok), score([{**it, "system": system} for it in items], model, tok)
    assert max(abs(a - b) for a, b in zip(s0, s1, strict=True)) > 1e-3

    model, tok = converted
    it = text_items(1, seed=2)[0]
    got = encode_items([{**it, "system": "system: judge by helpfulness"}], tok, "text", 3)[0]
    expected = client_ids(tok, "system: judge by helpfulness\n" + it["prompt"], it["reference"],
                          it["output"])
    # The system line is prepended once, not repeated before the candidate's prompt copy.
    assert got != expected
    text = tok.decode(got, skip_special_tokens=True)
    assert text.startswith("system: judge by helpfulness\n" + it["prompt"])
    assert text.count("system") == 1


def test_bad_items_are_errors_naming_the_item(native):
    model, tok = native
    good = world_items(3)
    cases = [
        ({"prompt": "a", "output": "b"}, r"item 1: missing 'reference'"),
        ({"prompt": "a", "reference": " ", "output": "b"}, r"item 1: empty reference"),
        ({**good[0], "wrapper": "chat"}, r"item 1: wrapper must be one of"),
        ({**good[0], "output": [{"role": "assistant"}]}, r"item 1: output\[0\] must be a message"),
        ({**good[0], "output": 7}, r"item 1: output must be a string or a list"),
        ({**good[0], "score": 1}, r"item 1: unknown fields \['score'\]"),
        ("text", r"item 1: expected a dict"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            score([good[0], bad, good[2]], model, tok)
    with pytest.raises(TypeError, match="list of dicts"):
        parse_items(good[0])
    assert score([], model, tok) == []


def test_reward_scorer_loads_a_folder_and_applies_the_offset(native, tmp_path):
    model, tok = native
    items = world_items(5, seed=8)
    model.save_pretrained(tmp_path / "rm")
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        RewardScorer.from_pretrained(tmp_path / "rm")
    tok.save_pretrained(str(tmp_path / "rm"))
    scorer = RewardScorer.from_pretrained(tmp_path / "rm", batch_size=2)
    expected = score(items, model, tok)
    assert scorer(items) == pytest.approx(expected, abs=1e-6)
    assert scorer.rewards([it["prompt"] for it in items], [it["reference"] for it in items],
                          [it["output"] for it in items]) == pytest.approx(expected, abs=1e-6)
    scorer.model.meta["score_offset"] = 0.5
    assert scorer(items) == pytest.approx([e + 0.5 for e in expected], abs=1e-6)
    with pytest.raises(ValueError, match="differ in length"):
        scorer.rewards(["a"], [], ["b"])
