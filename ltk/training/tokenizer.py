"""Tokenizer: text <-> token ids, and how many bytes of text each token stands for.

A thin wrapper over the Hugging Face `tokenizers` library (Rust, parallel), which does the
work; this class fixes the choices that matter for pre-training data:

* Byte-level BPE (GPT-2, Radford et al. 2019, section 2.2). The base alphabet is the 256
  byte values, so any text, in any script, with any typo, encodes without an unknown token;
  merges learned from the corpus then pack frequent byte runs into single tokens.
* One end-of-text token. It is put after every document, so it must be a special token
  that no text can produce by accident: a document that happens to contain the characters
  "<|endoftext|>" encodes them as ordinary text (encode_special_tokens), never as the id.
* No truncation, padding or added BOS from a loaded tokenizer.json: a data pipeline must
  encode a document completely and exactly.
* token_byte_lengths(): the UTF-8 bytes behind each id, to turn a loss per token into bits
  per byte, the number that compares models with different tokenizers.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT_TOKEN = "<|endoftext|>"

# Tried in order when a loaded tokenizer does not say which token ends a text.
EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "[SEP]")

_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece-style single-byte tokens


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from the 256 byte values to 256 printable characters.

    BPE libraries work on strings, but byte-level BPE works on bytes, so each byte is given
    a stand-in character. Printable Latin-1 bytes ("!".."~", "¡".."¬", "®".."ÿ") stand for
    themselves; the other 68 (controls, space, ...) are moved to U+0100 onwards, which is why
    GPT-2 vocabularies show a space as "Ġ" (U+0120). One character always means one byte.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, moved = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + moved)
            moved += 1
    return table


_BYTE_CHARS = frozenset(bytes_to_unicode().values())


class Tokenizer:
    """Encode/decode with a `tokenizers.Tokenizer` and a known end-of-text token."""

    def __init__(self, backend: tokenizers.Tokenizer, eot_token: str = EOT_TOKEN):
        """Wrap `backend` (switching off its truncation and padding) with `eot_token` as end-of-text."""
        eot_id = backend.token_to_id(eot_token)
        if eot_id is None:
            raise ValueError(f"end-of-text token {eot_token!r} is not in the tokenizer's vocabulary")
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = True  # text can never forge a special token
        self.backend = backend
        self.eot_token = eot_token
        self.eot_id = eot_id
        self._vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self._byte_lengths: np.ndarray | None = None

    # -- making one ------------------------------------------------------------------------

    @classmethod
    def train_bpe(cls, texts: Sequence[str], vocab_size: int, *, eot_token: str = EOT_TOKEN) -> "Tokenizer":
        """Learn a byte-level BPE of `vocab_size` tokens (256 bytes + merges + end-of-text).

        On a small corpus the library may run out of pairs to merge first; then the
        vocabulary is smaller than asked, so always read `vocab_size` back from the result.
        """
        if vocab_size < 257:
            raise ValueError(f"vocab_size must be at least 257 (256 byte tokens + end-of-text), got {vocab_size}")
        backend = tokenizers.Tokenizer(models.BPE())
        # No prefix space: a document's first word is not silently changed to " word".
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[eot_token],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return cls(backend, eot_token)

    @classmethod
    def load(cls, path: str | Path, *, eot_token: str | None = None) -> "Tokenizer":
        """Read a tokenizer.json file, or a Hugging Face model folder that contains one.

        The end-of-text token is `eot_token` if given, else the folder's tokenizer_config.json
        `eos_token`, else the first of EOT_CANDIDATES that the vocabulary has.
        """
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        config_eos = None
        file = path
        if path.is_dir():
            file = path / "tokenizer.json"
            if not file.is_file():
                raise FileNotFoundError(f"{path} has no tokenizer.json (a folder with only a SentencePiece "
                                        "tokenizer.model must first be saved as a fast tokenizer)")
            config_eos = _eos_from_config(path / "tokenizer_config.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception for malformed files
            raise ValueError(f"cannot read tokenizer {file}: {e}") from e
        if eot_token is None:
            eot_token = _find_eot(backend, config_eos, file)
        return cls(backend, eot_token)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json (into `path` if it is a folder); returns the file written."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        self.backend.save(str(path))
        return path

    # -- using one -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """One past the largest id, special tokens included (= the number of tokens when ids
        are contiguous, as in every tokenizer trained here): the embedding table's rows."""
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once, in parallel threads inside the library."""
        return [enc.ids for enc in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        """int64 array (vocab_size,): how many bytes of UTF-8 text each token id stands for.

        Bits per byte = sum of per-token losses / ln 2 / bytes covered, with the bytes counted
        by summing this array over the target ids. Special tokens stand for no text: 0.

        Byte-level tokens are exact: each character of the token string is the stand-in for
        one byte (bytes_to_unicode), so the length is the string's length. Decoding a single
        token would be wrong here, since a token can hold part of a multi-byte character.
        Other tokenizers (SentencePiece, WordPiece) fall back to the bytes of decode([id]),
        which can be off by a word-leading space, so their bits per byte are approximate.
        """
        if self._byte_lengths is None:
            vocab = self.backend.get_vocab(with_added_tokens=True)
            special = {i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special}
            byte_level = _is_byte_level(self.backend)
            lengths = np.zeros(self.vocab_size, dtype=np.int64)
            for token, i in vocab.items():
                if i in special:
                    continue
                if byte_level and set(token) <= _BYTE_CHARS:
                    lengths[i] = len(token)
                elif _BYTE_FALLBACK.fullmatch(token):
                    lengths[i] = 1
                else:
                    lengths[i] = len(self.backend.decode([i], skip_special_tokens=False).encode("utf-8"))
            self._byte_lengths = lengths
        return self._byte_lengths

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eot={self.eot_token!r} id {self.eot_id})"


def _is_byte_level(backend: tokenizers.Tokenizer) -> bool:
    """GPT-2 style: a ByteLevel decoder (Llama 3 and Qwen wrap the pre-tokenizer in a Sequence)."""
    return (isinstance(backend.decoder, decoders.ByteLevel)
            or isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel))


def _eos_from_config(path: Path) -> str | None:
    """tokenizer_config.json's eos_token: a string, or {"content": ...} in older files."""
    if not path.is_file():
        return None
    eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def _find_eot(backend: tokenizers.Tokenizer, config_eos: str | None, file: Path) -> str:
    candidates = ([config_eos] if config_eos else []) + list(EOT_CANDIDATES)
    for token in candidates:
        if backend.token_to_id(token) is not None:
            return token
    raise ValueError(f"{file}: cannot tell which token ends a text; none of {candidates} is in the "
                     "vocabulary. Name it with eot_token=... or an eos_token in tokenizer_config.json")
