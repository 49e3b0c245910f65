"""Tokenizers: the synthetic world's character-level tokenizer, and any tokenizer folder.

The world's tokenizer maps each content token to one unicode character, so a token sequence
and its text are interchangeable: encoding the POLAR template *text* gives exactly the
concatenation of its pieces' ids. Special tokens (pad, bos, eos, unk, the reward token) are
matched before the character split, and the template's ``"\\n"`` is an ordinary one-character
token that policies are never allowed to emit.

Ids: 0 pad, 1 bos, 2 eos, 3 unk, 4 ``<|reward|>``, 5 ``"\\n"``, then the content tokens.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
UNK_TOKEN = "<|unk|>"
REWARD_TOKEN = "<|reward|>"  # the template's separator and the token the RM scores at
NEWLINE = "\n"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, REWARD_TOKEN)
FIRST_CONTENT_ID = len(SPECIAL_TOKENS) + 1  # after the specials and "\n"

# Content characters: Latin Extended-A/B letters first (readable in a terminal), then CJK
# ideographs. Neither range holds whitespace, "<", "|" or ">", so no run of content characters
# can spell a special token.
_LATIN = (0x0100, 0x0250)
_CJK = (0x4E00, 0x9FFF)
MAX_CONTENT_VOCAB = (_LATIN[1] - _LATIN[0]) + (_CJK[1] - _CJK[0])


def content_char(index: int) -> str:
    """The character of content token ``index`` (0-based, before the id offset)."""
    if not 0 <= index < MAX_CONTENT_VOCAB:
        raise ValueError(f"content token index {index} outside [0, {MAX_CONTENT_VOCAB})")
    n_latin = _LATIN[1] - _LATIN[0]
    if index < n_latin:
        return chr(_LATIN[0] + index)
    return chr(_CJK[0] + index - n_latin)


def build_world_tokenizer(content_vocab: int) -> PreTrainedTokenizerFast:
    """A character-level tokenizer with ``content_vocab`` content tokens plus the specials.

    Right padding is the saved default (the reward model reads the last non-pad position,
    which works for either side); policies pad on the left themselves when generating.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    if not 2 <= content_vocab <= MAX_CONTENT_VOCAB:
        raise ValueError(f"content_vocab must be in [2, {MAX_CONTENT_VOCAB}], got {content_vocab}")
    pieces = list(SPECIAL_TOKENS) + [NEWLINE] + [content_char(i) for i in range(content_vocab)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters join without spaces
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # padding_side must be passed here: set afterwards it is not saved.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN, extra_special_tokens=[REWARD_TOKEN], padding_side="right",
        model_max_length=1 << 20, clean_up_tokenization_spaces=False)


def save_world_tokenizer(content_vocab: int, path: str | Path) -> PreTrainedTokenizerFast:
    """Build the world tokenizer and save it to folder ``path``; returns the reloaded copy."""
    build_world_tokenizer(content_vocab).save_pretrained(str(path))
    return load_tokenizer(path)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder (never the hub); the reward token must be known.

    Use :func:`add_reward_token` first for a tokenizer that lacks ``<|reward|>``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                              local_files_only=True)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer at {path} has no pad token")
    reward_token_id(tokenizer)
    return tokenizer


def reward_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id of ``<|reward|>`` in ``tokenizer``; a ValueError if the tokenizer lacks it."""
    tid = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {REWARD_TOKEN} token (see add_reward_token)")
    return int(tid)


def add_reward_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add ``<|reward|>`` (and a pad token if missing) to a real model's tokenizer, in place.

    The reward model then needs its embedding matrix resized to ``len(tokenizer)``.
    """
    if tokenizer.convert_tokens_to_ids(REWARD_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def newline_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the template's ``"\\n"`` in ``tokenizer`` (one id in the world tokenizer)."""
    ids = tokenizer.encode(NEWLINE, add_special_tokens=False)
    if not ids:
        raise ValueError("tokenizer encodes '\\n' to nothing")
    return list(ids)
