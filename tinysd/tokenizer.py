"""A word-level tokenizer for captions of handwritten digits, and a caption generator.

Stable Diffusion's text encoder is CLIP, which reads byte-pair tokens from a 49,408-entry
vocabulary.  Our captions only ever talk about digits ("a handwritten digit seven", "the number
7"), so a fixed list of about 150 words does the same job and is easy to read.  What matters is
the same as in CLIP:

* every caption becomes a row of exactly ``context_length`` integer ids:
  ``BOS w1 w2 ... wk EOS PAD PAD ...``  (too long: cut, keeping EOS as the last id);
* the text encoder reads the whole row, and CLIP pools the feature at the EOS position
  (``eos_positions``) into one vector per caption.

Text is normalised before it is split: lower-cased, and every character that is not an ASCII
letter or digit acts as a space, so punctuation disappears ("Seven." -> "seven",
"hand-written" -> "hand written").  A token is a run of letters or a single digit, so "17"
becomes "1" "7" and "digit7" becomes "digit" "7".  A word outside the vocabulary becomes the UNK
id rather than an error: a prompt with a typo or an unseen word still encodes, and the model
sees that something unknown was there.

The vocabulary is a fixed built-in list, so ids never change between runs or machines: a
trained text encoder stays valid.  Append new words at the end only.
"""

from __future__ import annotations

import re

import numpy as np

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMERALS = tuple(str(d) for d in range(10))

# Caption words.  Fixed order: a word's id is its position in VOCAB.  Append, never reorder.
CAPTION_WORDS = (
    # articles, glue words
    "a", "an", "the", "of", "on", "in", "with", "by", "and", "or", "to", "at", "as", "its",
    "this", "that", "it", "is", "here", "there", "what", "some", "very", "quite", "not",
    # what the picture is
    "digit", "digits", "number", "numbers", "numeral", "numerals", "figure", "character",
    "symbol", "picture", "photo", "image", "drawing", "sketch", "scan", "scanned", "sample",
    "example", "mnist", "style", "pixel", "pixels", "grayscale",
    # how it was made
    "handwritten", "hand", "written", "drawn", "draw", "write", "scrawled", "scribbled",
    "someone", "person", "pen", "pencil", "ink", "marker", "chalk", "handwriting",
    "showing", "shows", "show", "looks", "like", "looking", "single", "lone", "just",
    # colours and background
    "black", "white", "gray", "grey", "dark", "light", "background", "paper", "blackboard",
    # size and style
    "small", "large", "big", "tiny", "huge", "little", "wide", "narrow", "tall", "short",
    "neat", "neatly", "tidy", "clean", "messy", "sloppy", "sloppily", "careless", "careful",
    "carefully", "quick", "quickly", "bold", "thin", "thick", "faint", "blurry", "sharp",
    "crisp", "plain", "simple", "fancy", "round", "rounded", "curly", "straight",
    "slanted", "tilted", "italic", "upright", "centered", "centred", "shaky", "wobbly",
    "clear", "clearly", "nice", "pretty", "ugly", "odd", "strange", "low", "high",
    "resolution", "square",
)

VOCAB = SPECIAL_TOKENS + DIGIT_WORDS + NUMERALS + CAPTION_WORDS

_TOKEN_RE = re.compile(r"[a-z]+|[0-9]")


def normalize(text):
    """Lower-case ``text`` and split it into tokens: runs of ASCII letters, or single digits.
    Everything else (spaces, punctuation, other symbols) only separates tokens."""
    return _TOKEN_RE.findall(text.lower())


def _check_texts(texts):
    """One str or a list/tuple of str, as a list; anything else is a TypeError naming what came."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        got = type(texts).__name__ if not isinstance(texts, (list, tuple)) else \
            f"a {type(texts).__name__} holding {sorted({type(t).__name__ for t in texts})}"
        raise TypeError(f"Tokenizer: expected a str or a list of str, got {got}")
    return list(texts)


class Tokenizer:
    """Word-level tokenizer with a fixed vocabulary and a fixed context length.

    >>> tok = Tokenizer(context_length=8)
    >>> ids = tok.encode("A handwritten 7!")      # [BOS, a, handwritten, 7, EOS]
    >>> tok.decode(ids)
    'a handwritten 7'
    >>> tok(["a 7", "the digit seven"]).shape     # padded with PAD
    (2, 8)
    """

    def __init__(self, context_length=16, vocab=VOCAB):
        if context_length < 2:
            raise ValueError(f"Tokenizer: context_length must be at least 2 (BOS and EOS), got {context_length}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("Tokenizer: the vocabulary has repeated words")
        if tuple(vocab[:4]) != SPECIAL_TOKENS:
            raise ValueError(f"Tokenizer: the vocabulary must start with {SPECIAL_TOKENS}")
        self.context_length = int(context_length)
        self.vocab = tuple(vocab)
        self.word_to_id = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3

    @property
    def vocab_size(self):
        return len(self.vocab)

    def tokenize(self, text):
        """The words of ``text`` after normalisation (see ``normalize``)."""
        return normalize(text)

    def encode(self, text):
        """``text`` -> [BOS, ids..., EOS], at most ``context_length`` long.

        A caption too long to fit is cut after its first ``context_length - 2`` words, and EOS
        stays last.  Words outside the vocabulary map to ``unk_id``.
        """
        ids = [self.word_to_id.get(w, self.unk_id) for w in self.tokenize(text)]
        return [self.bos_id] + ids[: self.context_length - 2] + [self.eos_id]

    def __call__(self, texts):
        """One caption or a list of them -> int64 array (N, context_length), padded with PAD."""
        texts = _check_texts(texts)
        out = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            out[row, : len(ids)] = ids
        return out

    def eos_positions(self, ids):
        """Index of the (first) EOS in each row of ``ids`` (N, L): where CLIP pools its text
        features.  Works on NumPy and CuPy arrays."""
        is_eos = ids == self.eos_id
        if not bool(is_eos.any(axis=-1).all()):
            raise ValueError("Tokenizer.eos_positions: a row has no EOS token")
        return is_eos.argmax(axis=-1)

    def decode(self, ids, skip_special_tokens=True):
        """ids -> text.  Stops at the first EOS; BOS and PAD are dropped (unless
        ``skip_special_tokens=False``); UNK shows as ``<unk>``."""
        words = []
        for i in (int(i) for i in ids):
            if i == self.eos_id and skip_special_tokens:
                break
            if skip_special_tokens and i in (self.bos_id, self.pad_id):
                continue
            words.append(self.vocab[i] if 0 <= i < self.vocab_size else UNK)
        return " ".join(words)

    def __len__(self):
        return self.vocab_size

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


# ----------------------------------------------------------------------------------------------
# Random captions for a digit
# ----------------------------------------------------------------------------------------------

# {d}: the digit as a word or a numeral, picked at random; {word} / {num}: always that form;
# {adj}: an adjective or nothing.  "a" becomes "an" before a vowel sound ("an eight", "an 8").
CAPTION_TEMPLATES = (
    "{d}",
    "digit {word}",
    "number {num}",
    "the number {d}",
    "handwritten {d}",
    "a {adj} handwritten digit {word}",
    "a {adj} handwritten {d}",
    "a picture of a {adj} {d}",
    "an image of the numeral {d}",
    "a {adj} drawing of the digit {d}",
    "a photo of a handwritten {d}",
    "the digit {d} written by hand",
    "this is a {adj} {d}",
    "a {adj} {d} on a black background",
    "a sketch of the number {word}",
    "white {d} on black",
    "the numeral {num} in {adj} handwriting",
    "a scanned image of a {adj} handwritten number {d}",
)

CAPTION_ADJECTIVES = (
    "", "small", "large", "big", "neat", "messy", "sloppy", "scrawled", "bold", "thin",
    "thick", "tidy", "faint", "slanted", "tilted", "round", "shaky", "clean",
)


def _fix_articles(words):
    """'a' -> 'an' before a vowel sound, and back: 'a eight' -> 'an eight', 'an 7' -> 'a 7'."""
    out = list(words)
    for i in range(len(out) - 1):
        if out[i] in ("a", "an"):
            nxt = out[i + 1]
            vowel = nxt == "8" or (nxt[0] in "aeio" and nxt != "one")
            out[i] = "an" if vowel else "a"
    return out


def fill_caption(template, digit, as_word=True, adjective=""):
    """Fill one template for ``digit``: ``{d}`` becomes the word (``as_word``) or the numeral."""
    word, num = DIGIT_WORDS[digit], NUMERALS[digit]
    text = template.format(d=word if as_word else num, word=word, num=num, adj=adjective)
    return " ".join(_fix_articles(text.split()))  # split() also drops the gap an empty {adj} leaves


def all_digit_captions(digit):
    """Every caption ``digit_captions`` can produce for ``digit`` (for tests and inspection)."""
    return sorted(
        {
            fill_caption(t, digit, as_word, adj)
            for t in CAPTION_TEMPLATES
            for as_word in (True, False)
            for adj in CAPTION_ADJECTIVES
        }
    )


def digit_captions(digit, rng):
    """A random caption for ``digit`` (0-9), drawn with ``rng`` (a ``numpy.random.Generator``):
    a random template, the digit as a word or a numeral, and a random adjective (or none)."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit_captions: digit must be 0..9, got {digit}")
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    adjective = CAPTION_ADJECTIVES[rng.integers(len(CAPTION_ADJECTIVES))]
    return fill_caption(template, int(digit), as_word=bool(rng.integers(2)), adjective=adjective)
