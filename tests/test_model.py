import torch

from polar_scaling.losses import bradley_terry_loss, pair_metrics, pair_scores
from polar_scaling.model import RewardModel
from polar_scaling.sizes import get_size, hf_config


def tiny_rm(seed=0):
    torch.manual_seed(seed)
    rm = RewardModel.from_config(hf_config(get_size("t25k").with_vocab(50), pad_token_id=0))
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    return rm.eval()


def seqs(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 50, (int(torch.randint(3, 17, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def pad(batch, side):
    t = max(map(len, batch))
    ids = torch.zeros(len(batch), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(batch):
        sl = slice(t - len(s), t) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


@torch.no_grad()
def test_left_right_and_single_scores_agree():
    rm, batch = tiny_rm(), seqs()
    left = rm(*pad(batch, "left"))
    right = rm(*pad(batch, "right"))
    single = torch.cat([rm(torch.tensor([s])) for s in batch])
    torch.testing.assert_close(left, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, single, atol=1e-5, rtol=0)
    assert single.std() > 1e-3  # scores differ between sequences: the test can fail


@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    rm, batch = tiny_rm(), seqs()
    ids, mask = pad(batch, "right")
    rm.meta["reward_token_id"] = 7
    rm.save_pretrained(tmp_path / "rm")
    assert (tmp_path / "rm" / "model.safetensors").is_file()
    loaded = RewardModel.from_pretrained(tmp_path / "rm").eval()
    assert torch.equal(loaded(ids, mask), rm(ids, mask))
    assert loaded.meta["reward_token_id"] == 7


@torch.no_grad()
def test_saved_folder_loads_as_hf_sequence_classifier(tmp_path):
    from transformers import AutoModelForSequenceClassification

    rm, batch = tiny_rm(), seqs(1)
    rm.save_pretrained(tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ids = torch.tensor(batch)
    torch.testing.assert_close(hf(ids).logits.squeeze(-1), rm(ids), atol=1e-5, rtol=0)


def test_base_folder_is_loaded_and_recorded(tmp_path):
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM(hf_config(get_size("t25k").with_vocab(50)))
    lm.save_pretrained(tmp_path / "base")
    rm = RewardModel.from_base(tmp_path / "base")
    assert rm.meta["base"] == str(tmp_path / "base")
    torch.testing.assert_close(rm.model.embed_tokens.weight, lm.model.embed_tokens.weight)


def test_missing_folders_are_clear_errors(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="config.json"):
        RewardModel.from_base(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a reward model"):
        RewardModel.from_pretrained(tmp_path)


def test_bradley_terry_loss_and_metrics():
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 3.0])
    loss = bradley_terry_loss(chosen, rejected)
    expected = -torch.log(torch.sigmoid(chosen - rejected)).mean()
    torch.testing.assert_close(loss, expected)
    m = pair_metrics(chosen, rejected)
    assert m["accuracy"] == (1 + 0.5 + 0) / 3
    assert m["margin"] == (2 + 0 - 2) / 3
    c, r = pair_scores(torch.arange(6.0))
    assert c.tolist() == [0, 1, 2] and r.tolist() == [3, 4, 5]
