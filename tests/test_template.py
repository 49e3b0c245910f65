"""The POLAR template, its truncation, and the world tokenizer it is encoded with."""

from __future__ import annotations

import numpy as np
import pytest

from polar_scaling.template import (
    TemplateIds,
    encode_polar,
    encode_polar_np,
    encode_polar_text,
    polar_text,
    truncate,
)
from polar_scaling.tokenizer import (
    FIRST_CONTENT_ID,
    REWARD_TOKEN,
    build_world_tokenizer,
    content_char,
    load_tokenizer,
    reward_token_id,
    save_world_tokenizer,
)

NL, R = 100, 101  # hand-picked ids of "\n" and the reward token
IDS = TemplateIds(newline=(NL,), separator=(R,), reward=R)


def test_text_template_both_wrappers_exactly():
    assert polar_text("P", "ref", "cand") == "P\nref<|reward|>P\ncand<|reward|>"
    assert polar_text("P", "ref", "cand", "pretrain") == "Pref<|reward|>Pcand<|reward|>"
    assert polar_text("P", "r", "c", "sft", system="S") == "S\nP\nr<|reward|>P\nc<|reward|>"
    assert polar_text("P", "r", "c", "pretrain", system="S") == "S\nPr<|reward|>Pc<|reward|>"
    with pytest.raises(ValueError, match="wrapper"):
        polar_text("P", "r", "c", "chat")


def test_ids_template_hand_written():
    assert encode_polar([1, 2], [3], [4, 5], IDS) == [1, 2, NL, 3, R, 1, 2, NL, 4, 5, R]
    assert encode_polar([1, 2], [3], [4, 5], IDS, "pretrain") == [1, 2, 3, R, 1, 2, 4, 5, R]
    assert encode_polar([1], [3], [4], IDS, system=[9, 9]) == [9, 9, NL, 1, NL, 3, R, 1, NL, 4, R]


def test_truncation_cuts_responses_right_and_prompt_left():
    ids = TemplateIds((NL,), (R,), R, max_length=13, max_response_length=3)
    prompt, ref, cand = [10, 11, 12, 13], [1, 2, 3, 4, 5], [6, 7]
    # responses: ref -> first 3; prompt budget (13 - 4 - 3 - 2) // 2 = 2 -> last 2 tokens
    assert truncate(prompt, ref, cand, ids) == ([12, 13], [1, 2, 3], [6, 7])
    out = encode_polar(prompt, ref, cand, ids)
    assert out == [12, 13, NL, 1, 2, 3, R, 12, 13, NL, 6, 7, R]
    assert len(out) == 13  # max_length is met exactly in the sft wrapper
    # odd budgets round down, as the official client's // 2 does
    ids14 = TemplateIds((NL,), (R,), R, max_length=14, max_response_length=3)
    assert truncate(prompt, ref, cand, ids14)[0] == [12, 13]
    # a system prompt takes its tokens and a newline off the prompt budget
    assert truncate(prompt, ref, cand, TemplateIds((NL,), (R,), R, 16, 3), system=[9])[0] == \
        [12, 13]


def test_zero_prompt_budget_keeps_no_prompt_not_the_whole_prompt():
    # p[-0:] would keep everything; the budget of 0 must keep nothing
    ids = TemplateIds((NL,), (R,), R, max_length=9, max_response_length=3)
    assert truncate([1, 2, 3], [4, 5], [6, 7], ids)[0] == []
    ids = TemplateIds((NL,), (R,), R, max_length=5, max_response_length=3)
    assert truncate([1, 2, 3], [4, 5, 6], [7, 8], ids) == ([], [4, 5, 6], [7, 8])


def test_no_limits_means_no_truncation():
    long = list(range(500))
    assert truncate(long, long, long, IDS) == (long, long, long)
    with pytest.raises(ValueError, match="max_length"):
        TemplateIds((NL,), (R,), R, max_length=4)


@pytest.mark.parametrize("wrapper", ["sft", "pretrain"])
def test_numpy_path_equals_list_path(wrapper):
    rng = np.random.default_rng(0)
    for trial in range(200):
        limits = [(None, None), (60, 12), (30, 20), (12, 3)][trial % 4]
        ids = TemplateIds((NL,), (R,), R, *limits)
        p, r, c = (rng.integers(0, 50, size=rng.integers(0, 30)) for _ in range(3))
        system = rng.integers(0, 50, size=3) if trial % 3 == 0 else None
        got = encode_polar_np(p, r, c, ids, wrapper, system)
        want = encode_polar(p.tolist(), r.tolist(), c.tolist(), ids, wrapper,
                            None if system is None else system.tolist())
        assert got.dtype == np.int64 and got.tolist() == want


def test_world_tokenizer_is_character_level_with_specials(tmp_path):
    tok = save_world_tokenizer(20, tmp_path / "tok")
    assert len(tok) == FIRST_CONTENT_ID + 20
    assert tok.pad_token_id == 0 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert reward_token_id(tok) == 4 and tok.encode("\n", add_special_tokens=False) == [5]
    assert tok.padding_side == "right"  # saved in the folder, not only set in memory
    assert '"padding_side": "right"' in (tmp_path / "tok" / "tokenizer_config.json").read_text()
    text = "".join(content_char(i) for i in range(20))
    assert tok.encode(text, add_special_tokens=False) == list(range(FIRST_CONTENT_ID,
                                                                    FIRST_CONTENT_ID + 20))
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.encode("<", add_special_tokens=False) == [tok.unk_token_id]


@pytest.mark.parametrize("wrapper", ["sft", "pretrain"])
def test_tokenizing_the_template_text_equals_concatenating_piece_ids(tmp_path, wrapper):
    tok = build_world_tokenizer(30)
    rng = np.random.default_rng(1)

    def text(n):
        return "".join(content_char(int(i)) for i in rng.integers(0, 30, size=n))

    for n in (0, 1, 7):
        p, r, c, s = text(n + 3), text(n), text(n + 1), text(2)
        full = tok.encode(polar_text(p, r, c, wrapper, system=s), add_special_tokens=False)
        assert full == encode_polar_text(tok, p, r, c, wrapper, system=s)
        assert full.count(reward_token_id(tok)) == 2 and full[-1] == reward_token_id(tok)
        # the template text also round-trips through decode
        assert tok.decode(full) == polar_text(p, r, c, wrapper, system=s)


def test_template_ids_from_tokenizer_and_missing_reward_token(tmp_path):
    tok = build_world_tokenizer(8)
    ids = TemplateIds.from_tokenizer(tok, 64, 16)
    assert ids == TemplateIds((5,), (4,), 4, 64, 16)
    tok.save_pretrained(str(tmp_path / "t"))
    assert load_tokenizer(tmp_path / "t").convert_tokens_to_ids(REWARD_TOKEN) == 4
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        load_tokenizer(tmp_path / "missing")
