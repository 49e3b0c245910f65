"""Preference files (reading, validation, encoding) and the synthetic preference set."""

import json

import numpy as np
import pytest

from polar_scaling.data import TrajectoryDataset, load_kl
from polar_scaling.preferences import (
    RELATIONS,
    Preference,
    PreferenceError,
    categories,
    encode_preferences,
    main,
    parse_preference,
    public_row,
    read_preferences,
    split_by_prompt,
    synth_preferences,
    write_preferences,
)
from polar_scaling.template import TemplateIds, encode_polar, encode_polar_text
from polar_scaling.tokenizer import build_world_tokenizer, content_char

A, B, C, D, E = (content_char(i) for i in range(5))


def row(**kw):
    base = {"prompt": A + B, "reference": C + C, "chosen": C + D, "rejected": E}
    return {**base, **kw}


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_read_rows_strings_messages_and_optional_fields(tmp_path):
    msgs = [{"role": "user", "content": A}, {"role": "assistant", "content": B}]
    path = write_lines(tmp_path / "p.jsonl", [
        row(), "", row(prompt=msgs, category="stem", system=D)])
    rows = read_preferences(path)
    assert rows[0] == Preference(A + B, C + C, C + D, E)
    # Messages join by "\n" on their contents, roles dropped, as the scoring API does.
    assert rows[1].prompt == A + "\n" + B
    assert (rows[1].category, rows[1].system) == ("stem", D)
    assert categories(rows) == (["-", "stem"], pytest.approx(np.array([0, 1])))


@pytest.mark.parametrize("bad,message", [
    ({"prompt": A, "reference": B, "chosen": C}, "missing 'rejected'"),
    (row(reference="  "), "empty reference"),
    (row(reference=[]), "empty reference"),
    (row(chosen=E, rejected=E), "chosen equals rejected"),
    (row(chosen=[{"role": "a", "content": E}], rejected=E), "chosen equals rejected"),
    (row(score=1), "unknown fields ['score']"),
    (row(chosen=[{"role": "user"}]), "chosen[0] must be a message"),
    (row(prompt=3), "prompt must be a string or a list of messages"),
    (row(category=2), "category must be a string"),
    ([1, 2], "expected an object"),
])
def test_bad_rows_name_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "bad.jsonl", [row(), bad])
    with pytest.raises(PreferenceError) as e:
        read_preferences(path)
    assert f"{path}:2: " in str(e.value)
    assert message in str(e.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(PreferenceError, match="not found"):
        read_preferences(tmp_path / "none.jsonl")
    with pytest.raises(PreferenceError, match=r"x.jsonl:1: not JSON"):
        read_preferences(write_lines(tmp_path / "x.jsonl", ["{oops"]))
    with pytest.raises(PreferenceError, match="no preference rows"):
        read_preferences(write_lines(tmp_path / "e.jsonl", [""]))


@pytest.mark.parametrize("wrapper", ["sft", "pretrain"])
def test_encoding_with_and_without_reference_and_system(wrapper):
    tok = build_world_tokenizer(8)
    ids = TemplateIds.from_tokenizer(tok)
    rows = [Preference(A + B, C + C, C + D, E), Preference(A, D, B, C + A, system=E + E)]
    pairs = encode_preferences(rows, tok, wrapper)
    assert pairs.chosen[0].tolist() == encode_polar_text(tok, A + B, C + C, C + D, wrapper)
    assert pairs.rejected[0].tolist() == encode_polar_text(tok, A + B, C + C, E, wrapper)
    enc = {ch: tok.convert_tokens_to_ids(ch) for ch in (A, B, C, D, E)}
    nl = [] if wrapper == "pretrain" else list(ids.newline)
    # The system prompt comes first, then "\n", in both wrappers (conditional scoring).
    assert pairs.rejected[1].tolist() == ([enc[E], enc[E]] + list(ids.newline) + [enc[A]] + nl
                                          + [enc[D], ids.reward, enc[A]] + nl
                                          + [enc[C], enc[A], ids.reward])
    # Without the reference: the slot is empty, everything else stays.
    noref = encode_preferences(rows, tok, wrapper, with_reference=False)
    assert noref.chosen[0].tolist() == encode_polar([enc[A], enc[B]], [], [enc[C], enc[D]],
                                                    ids, wrapper)
    assert len(noref.chosen[1]) == len(pairs.chosen[1]) - 1
    # Truncation limits reach the template (responses cut on the right).
    cut = encode_preferences(rows, tok, wrapper, max_response_length=1)
    assert cut.chosen[0].tolist() == encode_polar([enc[A], enc[B]], [enc[C]], [enc[C]], ids,
                                                  wrapper)
    with pytest.raises(ValueError, match="wrapper"):
        encode_preferences(rows, tok, "chat")


def test_write_then_read_roundtrip(tmp_path):
    rows = [Preference(A, B, C, D, category="x"), Preference(A, B, D, C, system=E)]
    path = write_preferences(rows, tmp_path / "sub" / "r.jsonl")
    assert read_preferences(path) == rows
    assert "system" not in path.read_text().splitlines()[0]


# --------------------------------------------------------------------------- synthetic set


def test_synthetic_set_is_ranked_by_true_kl(tiny_dataset):
    rows = synth_preferences(tiny_dataset, min_z=0.0, groups_per_prompt=3)
    kl = load_kl(tiny_dataset)
    assert len(rows) > 0 and len(rows) % 3 == 0
    ds = TrajectoryDataset(tiny_dataset)
    family = {p["policy_id"]: p["family"] for p in ds.policies}
    heldout = {p["policy_id"] for p in ds.policies if p["split"] == "heldout"}
    for r in rows:
        parse_preference(public_row(r), "row")  # valid: non-empty reference, answers differ
        target = r["target"]
        assert kl[(target, r["chosen_policy"])] == r["kl_chosen"] < r["kl_rejected"] \
            == kl[(target, r["rejected_policy"])]
        rel = ["self" if p == target else "family" if family[p] == family[target] else "other"
               for p in (r["chosen_policy"], r["rejected_policy"])]
        assert r["category"] == f"{rel[0]}>{rel[1]}"
        assert {target, r["chosen_policy"], r["rejected_policy"]}.isdisjoint(heldout)
    # Each ranked triple A > B > C gives (A, B), (A, C), (B, C).
    a_b, a_c, b_c = rows[:3]
    assert a_b["chosen_policy"] == a_c["chosen_policy"]
    assert a_b["rejected_policy"] == b_c["chosen_policy"]
    assert a_c["rejected_policy"] == b_c["rejected_policy"]
    assert {c.split(">")[0] for c in (r["category"] for r in rows)} <= set(RELATIONS)
    # Deterministic in the seed; another seed draws other targets.
    assert synth_preferences(tiny_dataset, min_z=0.0, groups_per_prompt=3) == rows
    other = synth_preferences(tiny_dataset, min_z=0.0, groups_per_prompt=3, seed=1)
    assert [r["target"] for r in other] != [r["target"] for r in rows]


def test_synthetic_text_encodes_back_to_the_dataset_ids(tiny_dataset):
    rows = synth_preferences(tiny_dataset, min_z=0.0)
    ds = TrajectoryDataset(tiny_dataset)
    tok = ds.tokenizer()
    t = ds.load("heldout_prompts")
    index = {p["policy_id"]: p["index"] for p in ds.policies}
    checked = 0
    for r in rows:
        hit = np.nonzero((t.prompt_id == r["prompt_id"]) & (t.policy_index == index[r["target"]])
                         & (t.sample == 0))[0]
        assert len(hit) == 1
        ref_ids, prompt_ids = t.responses[hit[0]].tolist(), t.prompts[hit[0]].tolist()
        assert tok.encode(r["reference"], add_special_tokens=False) == ref_ids
        assert tok.encode(r["prompt"], add_special_tokens=False) == prompt_ids
        for side in ("chosen", "rejected"):
            ids = tok.encode(r[side], add_special_tokens=False)
            assert ids and min(ids) >= 6  # content tokens only: no unk, no specials
        checked += 1
    assert checked == len(rows)
    # The self candidate answers with another sample than the reference.
    selfs = [r for r in rows if r["chosen_policy"] == r["target"]]
    assert selfs and any(r["chosen"] != r["reference"] for r in selfs)


def test_min_z_drops_rankings_within_estimation_noise(tiny_dataset):
    loose = synth_preferences(tiny_dataset, min_z=0.0, groups_per_prompt=3)
    strict = synth_preferences(tiny_dataset, min_z=3.0, groups_per_prompt=3)
    se = load_kl(tiny_dataset, "stderr_per_sequence")
    # Cross-family KLs of the tiny world are within their noise: those rankings go.
    assert any(r["category"] == "other>other" for r in loose)
    assert not any(r["category"] == "other>other" for r in strict)
    for r in strict:
        gap = r["kl_rejected"] - r["kl_chosen"]
        noise = np.hypot(se[(r["target"], r["chosen_policy"])],
                         se[(r["target"], r["rejected_policy"])])
        assert gap > 3.0 * noise
    assert synth_preferences(tiny_dataset, min_z=1e9) == []


def test_split_by_prompt_is_disjoint():
    rows = [{"prompt_id": p, "k": k} for p in range(10) for k in range(3)]
    train, held = split_by_prompt(rows, 0.3)
    assert len(held) == 9 and len(train) == 21
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in held}
    with pytest.raises(ValueError):
        split_by_prompt(rows, 1.5)


def test_cli_synth_and_check(tiny_dataset, tmp_path, capsys):
    out, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    assert main(["synth", str(tiny_dataset), str(out), "--eval-out", str(ev), "--min-z", "0",
                 "--groups-per-prompt", "3", "--system", A]) == 0
    summary = json.loads(capsys.readouterr().out)
    train, held = read_preferences(out), read_preferences(ev)
    assert len(train) + len(held) == summary["rows"] > 0
    assert {r.prompt for r in train}.isdisjoint({r.prompt for r in held})
    assert all(r.system == A and r.category for r in train + held)
    assert main(["check", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == len(train)
    assert main(["synth", str(tmp_path / "nowhere"), str(out)]) == 2
    assert "not a trajectory dataset" in capsys.readouterr().err
    assert public_row({"prompt": A, "reference": B, "chosen": C, "rejected": D,
                       "target": "f0m0", "system": None}) == {
        "prompt": A, "reference": B, "chosen": C, "rejected": D}
