"""CLIP's byte-level BPE tokenizer, read from a Stable Diffusion folder's tokenizer/.

    tokenizer = CLIPTokenizer.from_pretrained("stable-diffusion-v1-5/tokenizer")
    ids = tokenizer(["a photo of a cat"])          # int64 (1, 77): BOS a photo of a cat EOS PAD ...

How a prompt becomes ids (Radford et al. 2021; Sennrich et al. 2016 for BPE):

1. Normalise: Unicode NFC, every run of whitespace becomes one space, lower-case.
2. Split into words, left to right, trying at each position in this order:
   a contraction 's 't 're 've 'm 'll 'd; a run of letters; ONE digit; a run of
   characters that are neither letters, digits nor whitespace. Whitespace separates
   words and is dropped. ("Don't panic!!" -> don, 't, panic, !!; "2024" -> 2, 0, 2, 4.)
3. Bytes as characters: each word's UTF-8 bytes are written with 256 printable
   stand-in characters (`bytes_to_unicode`), so an emoji or an accent is a few
   "characters" of a vocabulary that has every byte: nothing is ever unknown.
4. Byte-pair merges: start from the word's characters, the last one marked as the end
   of a word ("</w>"), and repeatedly join the adjacent pair that comes first in
   merges.txt (the order in which the pairs were learned) until no listed pair is left.
   Each resulting piece is looked up in vocab.json.
5. Frame: BOS + ids + EOS, cut to max_length (EOS kept last), padded with the pad token
   (EOS in SD 1, "!" in SD 2) to max_length.

These are the rules of transformers' CLIPTokenizer built from the same vocab.json and
merges.txt; tests/test_pretrained_tokenizer.py compares ids with it on tricky prompts.
"""

from __future__ import annotations

import json
import os
import unicodedata

import numpy as np

CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
SPECIAL_WORDS = ("<|startoftext|>", "<|endoftext|>")


def bytes_to_unicode():
    """byte -> printable character: the printable Latin-1 bytes stand for themselves, the
    other 68 (controls, space, ...) take the characters from U+0100 on, in order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _kind(ch):
    """'L' letter, 'N' digit/number, 'S' whitespace, 'P' anything else (Unicode categories)."""
    if ch.isspace():
        return "S"
    cat = unicodedata.category(ch)[0]
    return cat if cat in "LN" else "P"


def normalize(text):
    """NFC, whitespace runs -> one space, lower-case (step 1)."""
    text = unicodedata.normalize("NFC", text)
    return " ".join(text.split()).lower()


def split_words(text):
    """Step 2 on normalised text: the list of words."""
    words, i, n = [], 0, len(text)
    while i < n:
        special = next((w for w in SPECIAL_WORDS if text.startswith(w, i)), None)
        contraction = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
        kind = _kind(text[i])
        if special or contraction:
            j = i + len(special or contraction)
        elif kind == "S":
            i += 1
            continue
        elif kind == "N":
            j = i + 1
        else:  # a run of letters, or a run of "other" characters
            j = i + 1
            while j < n and _kind(text[j]) == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


class CLIPTokenizer:
    """Byte-level BPE with CLIP's normalisation and framing; see the module docstring.

    vocab: piece -> id (vocab.json); merges: list of (left, right) pairs in rank order.
    """

    def __init__(self, vocab, merges, model_max_length=77, bos_token="<|startoftext|>",
                 eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>"):
        self.encoder = dict(vocab)
        self.decoder = {i: piece for piece, i in self.encoder.items()}
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.model_max_length = int(model_max_length)
        for name, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)):
            if token not in self.encoder:
                raise ValueError(f"CLIPTokenizer: {name}_token {token!r} is not in the vocabulary")
        self.bos_token_id, self.eos_token_id = self.encoder[bos_token], self.encoder[eos_token]
        self.pad_token_id, self.unk_token_id = self.encoder[pad_token], self.encoder[unk_token]
        self._cache = {token: [token] for token in SPECIAL_WORDS}

    @classmethod
    def from_pretrained(cls, folder):
        """Read vocab.json, merges.txt and (if present) tokenizer_config.json / special_tokens_map.json."""
        folder = os.fspath(folder)
        paths = {name: os.path.join(folder, name) for name in ("vocab.json", "merges.txt")}
        missing = [name for name, path in paths.items() if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(f"CLIPTokenizer.from_pretrained: {folder} has no {' or '.join(missing)}")
        with open(paths["vocab.json"], encoding="utf-8") as f:
            vocab = json.load(f)
        with open(paths["merges.txt"], encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        options = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
                for key in ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length"):
                    value = config.get(key)
                    if isinstance(value, dict):  # {"content": "<|endoftext|>", "lstrip": false, ...}
                        value = value.get("content")
                    if value is not None and not (key == "model_max_length" and value > 10**6):
                        options[key] = value
        return cls(vocab, merges, **options)

    def __len__(self):
        return len(self.encoder)

    @property
    def vocab_size(self):
        return len(self.encoder)

    def bpe(self, word):
        """Step 4: a word (in byte characters) -> its BPE pieces."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), len(self.ranks)), k) for k, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, _ = min(pairs)
            if rank == len(self.ranks):
                break
            first, second = [(parts[k], parts[k + 1]) for r, k in pairs if r == rank][0]
            merged, k = [], 0
            while k < len(parts):  # join every occurrence of the pair, left to right
                if k + 1 < len(parts) and parts[k] == first and parts[k + 1] == second:
                    merged.append(first + second)
                    k += 2
                else:
                    merged.append(parts[k])
                    k += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def tokenize(self, text):
        """Steps 1-4: text -> list of BPE pieces (no BOS/EOS)."""
        pieces = []
        for word in split_words(normalize(text)):
            if word in SPECIAL_WORDS:
                pieces.append(word)
            else:
                pieces += self.bpe("".join(self.byte_encoder[b] for b in word.encode("utf-8")))
        return pieces

    def encode(self, text, max_length=None, truncation=True):
        """text -> [BOS, ids..., EOS], cut to max_length (default model_max_length) keeping EOS."""
        max_length = self.model_max_length if max_length is None else int(max_length)
        ids = [self.encoder.get(piece, self.unk_token_id) for piece in self.tokenize(text)]
        if truncation:
            ids = ids[: max(max_length - 2, 0)]
        return [self.bos_token_id] + ids + [self.eos_token_id]

    def __call__(self, texts, max_length=None):
        """One prompt or a list -> int64 array (N, max_length), padded with the pad token (step 5)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        max_length = self.model_max_length if max_length is None else int(max_length)
        out = np.full((len(texts), max_length), self.pad_token_id, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.encode(text, max_length)
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids, skip_special_tokens=True):
        """ids -> text (word ends become spaces)."""
        specials = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        pieces = [self.decoder.get(int(i), "") for i in ids if not (skip_special_tokens and int(i) in specials)]
        text = "".join(pieces).replace("</w>", " ")  # " " is no byte character: the space byte is "Ġ"
        data = bytearray(32 if c == " " else self.byte_decoder[c] for c in text if c == " " or c in self.byte_decoder)
        return data.decode("utf-8", errors="replace").strip()
