"""CLIP's BPE tokenizer gives transformers' ids (tests/fixtures/tiny_sd_expected.npz)."""

import os

import numpy as np
import pytest

from tinysd.clip_tokenizer import CLIPTokenizer, bytes_to_unicode, split_words

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(os.path.join(FIXTURES, "tiny_sd", "tokenizer"))


def test_tricky_prompts_match_transformers(tokenizer):
    """Capitals, punctuation, apostrophes, digits, accents, emoji, whitespace, empty, over-long."""
    expected = np.load(os.path.join(FIXTURES, "tiny_sd_expected.npz"))
    prompts = [str(p) for p in expected["tricky_prompts"]]
    ids = tokenizer(prompts)
    for prompt, ours, theirs in zip(prompts, ids, expected["tricky_ids"]):
        np.testing.assert_array_equal(ours, theirs, err_msg=repr(prompt))


def test_framing(tokenizer):
    ids = tokenizer(["", "a cat"])
    assert ids.shape == (2, 77) and ids.dtype == np.int64
    assert list(ids[0, :3]) == [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    long = tokenizer("cat " * 200)[0]
    assert long[0] == tokenizer.bos_token_id and long[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(tokenizer("A Cat, sitting!")[0]) == "a cat , sitting !"


def test_split_words():
    assert split_words("don't panic!! 2024 café") == ["don", "'t", "panic", "!!", "2", "0", "2", "4", "café"]
    assert split_words("''s x") == ["''", "s", "x"]


def test_bytes_to_unicode_is_a_bijection_onto_printable_characters():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == "\u0120"
