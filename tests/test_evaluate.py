"""``polar-train evaluate``: accuracy with and without the reference, per category, files."""

import json

import numpy as np
import pytest
import torch

from polar_scaling.config import ConfigError
from polar_scaling.errors import StageError
from polar_scaling.evaluate import (
    evaluate_preferences,
    format_table,
    pair_margins,
    run,
    summarize_margins,
)
from polar_scaling.model import RewardModel
from polar_scaling.preferences import Preference, write_preferences
from polar_scaling.scoring import score
from polar_scaling.sizes import get_size, hf_config
from polar_scaling.tokenizer import build_world_tokenizer, content_char

A, B, C, D = (content_char(i) for i in range(4))


class CountScorer(torch.nn.Module):
    """Scores a sequence by how many ``C`` tokens it holds: a model whose answers are known."""

    def __init__(self, c_id: int, meta: dict | None = None):
        super().__init__()
        self.c_id = c_id
        self.meta = meta or {}
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        return ((input_ids == self.c_id) & (attention_mask > 0)).sum(-1).float()


@pytest.fixture(scope="module")
def tok():
    return build_world_tokenizer(8)


def rows():
    # The reference holds C: with it, every sequence gets +1, so margins do not change; the
    # answers decide. Category "x": chosen has more C (right); "y": fewer (wrong); "z": ties.
    return [Preference(A, C, C + C, A, category="x"), Preference(B, C + C, C, A + A, "x"),
            Preference(A, C, A, C, category="y"), Preference(A, D, B, D, category="z"),
            Preference(A, C, C + A, D + C)]


def test_accuracy_per_category_with_ties_counting_half(tok):
    model = CountScorer(tok.convert_tokens_to_ids(C))
    res = evaluate_preferences(model, tok, rows(), batch_size=2)
    assert res["pairs"] == 5 and res["wrapper"] == "sft"
    cats = res["by_category"]
    assert list(cats) == ["-", "x", "y", "z"]
    assert cats["x"]["with_reference"]["accuracy"] == 1.0
    assert cats["y"]["with_reference"]["accuracy"] == 0.0
    assert cats["z"]["with_reference"]["accuracy"] == 0.5
    assert cats["-"]["with_reference"]["accuracy"] == 0.5
    assert res["with_reference"]["accuracy"] == pytest.approx((2 + 0 + 0.5 + 0.5) / 5)
    # The prompt and reference count twice in both sequences of a pair, so they cancel.
    assert res["without_reference"]["accuracy"] == res["with_reference"]["accuracy"]
    m = np.array([2.0, 1.0, -1.0, 0.0, 0.0])
    assert res["with_reference"]["loss"] == pytest.approx(np.mean(np.log1p(np.exp(-m))))
    assert res["with_reference"]["stderr"] == pytest.approx(np.sqrt(0.6 * 0.4 / 5))


def test_without_reference_empties_the_slot(tok):
    from polar_scaling.evaluate import encode_rows
    from polar_scaling.preferences import encode_preferences

    data = rows()
    for with_ref in (True, False):
        seqs = encode_rows(data, tok, {"reward_token_id": 4}, "sft", with_ref, None, None)
        pairs = encode_preferences(data, tok, "sft", with_reference=with_ref)
        assert seqs == [s.tolist() for s in pairs.chosen + pairs.rejected]
    # A scorer that is not additive over tokens, so the reference shows in the margin: the
    # square of the C count. Chosen has one C more than rejected, plus the reference's 3 or 0:
    # with the reference 4² - 3² = 7, without it 1² - 0² = 1.
    class Squared(CountScorer):
        def forward(self, input_ids, attention_mask):
            return super().forward(input_ids, attention_mask) ** 2

    row = [Preference(A, C + C + C, C, A + A)]
    model = Squared(tok.convert_tokens_to_ids(C))
    assert pair_margins(model, tok, row, "sft", True).tolist() == [7.0]
    assert pair_margins(model, tok, row, "sft", False).tolist() == [1.0]
    # A system prompt reaches the input too: its two C make it 6² - 5² and 3² - 2².
    row = [Preference(A, C + C + C, C, A + A, system=C + C)]
    assert pair_margins(model, tok, row, "sft", True).tolist() == [11.0]
    assert pair_margins(model, tok, row, "sft", False).tolist() == [5.0]


def test_margins_match_the_scoring_api(tok):
    torch.manual_seed(0)
    model = RewardModel.from_config(hf_config(get_size("t12k").with_vocab(len(tok)),
                                              pad_token_id=tok.pad_token_id),
                                    {"reward_token_id": 4, "wrapper": "pretrain"}).eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)
    data = rows()
    margins = pair_margins(model, tok, data, "pretrain", True, batch_size=3)
    items = [{"prompt": r.prompt, "reference": r.reference, "output": getattr(r, side),
              "wrapper": "pretrain"} for side in ("chosen", "rejected") for r in data]
    s = score(items, model, tok)
    assert np.allclose(margins, np.array(s[:5]) - np.array(s[5:]), atol=1e-5)
    # The wrapper defaults to the model's: "pretrain" here.
    assert evaluate_preferences(model, tok, data)["wrapper"] == "pretrain"


def test_stage_writes_json_table_and_summary(tok, tmp_path, capsys):
    torch.manual_seed(0)
    model = RewardModel.from_config(hf_config(get_size("t12k").with_vocab(len(tok)),
                                              pad_token_id=tok.pad_token_id), {"reward_token_id": 4})
    torch.nn.init.normal_(model.score.weight, std=1.0)
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(str(tmp_path / "rm"))
    data = write_preferences(rows(), tmp_path / "p.jsonl")
    out = run(None, [f"model={tmp_path / 'rm'}", f"data={data}", "batch_size=4"], tmp_path / "ev")
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    table = (tmp_path / "ev" / "eval.md").read_text()
    assert table in printed and "| **all** | 5 |" in table and "| x | 2 |" in table
    assert out["accuracy_with_reference"] == result["with_reference"]["accuracy"]
    assert out["accuracy_without_reference"] == result["without_reference"]["accuracy"]
    expect = evaluate_preferences(RewardModel.from_pretrained(tmp_path / "rm").eval(), tok, rows())
    assert result["with_reference"]["accuracy"] == expect["with_reference"]["accuracy"]
    assert json.loads((tmp_path / "ev" / "done.json").read_text()) == out


def test_format_table_rounds_percentages():
    res = {"wrapper": "sft", "pairs": 3, "with_reference": summarize_margins(np.array([1, 1, -1.])),
           "without_reference": summarize_margins(np.array([0.0, 0, 0])),
           "by_category": {"a": {"with_reference": summarize_margins(np.array([1.0])),
                                 "without_reference": summarize_margins(np.array([-1.0]))}}}
    table = format_table(res)
    assert "| a | 1 | 100.0 ± 0.0 | 0.0 ± 0.0 |" in table
    assert "| **all** | 3 | 66.7 ± 27.2 | 50.0 ± 28.9 |" in table


def test_bad_input(tok, tmp_path):
    data = write_preferences(rows(), tmp_path / "p.jsonl")
    with pytest.raises(ConfigError, match="model: required"):
        run(None, [f"data={data}"], tmp_path / "a")
    with pytest.raises(StageError, match="not a model folder"):
        run(None, [f"model={tmp_path}", f"data={data}"], tmp_path / "b")
    # A causal LM folder has no reward head: the error names the folder.
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_config(hf_config(get_size("t12k").with_vocab(len(tok)),
                                                    pad_token_id=0))
    lm.save_pretrained(tmp_path / "lm")
    with pytest.raises(StageError, match=f"model {tmp_path / 'lm'}: cannot load"):
        run(None, [f"model={tmp_path / 'lm'}", f"data={data}"], tmp_path / "c")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    (other / "model.safetensors").write_bytes(b"")
    with pytest.raises(StageError, match=f"model {other}: cannot load"):
        run(None, [f"model={other}", f"data={data}"], tmp_path / "d")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": A, "reference": B, "chosen": C, "rejected": C}) + "\n")
    with pytest.raises(StageError, match=f"{bad}:1: chosen equals rejected"):
        run(None, [f"model={tmp_path / 'lm'}", f"data={bad}"], tmp_path / "e")
