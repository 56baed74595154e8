"""Tokenizers: SentencePiece for LLaMA 1/2 `tokenizer.model` files, tiktoken for Llama 3's.

`load_tokenizer` picks the class from the file's contents. Both classes share one interface:
`n_words`, `bos_id`, `eos_id`, `pad_id`, `stop_ids`, `encode(s, bos, eos)` and `decode(ids)`.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path
from typing import Dict, FrozenSet, List, Sequence, Union

from sentencepiece import SentencePieceProcessor


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist: pass --tokenizer_path "
                                "pointing at the checkpoint's tokenizer.model")


def _checked_text(s: str) -> str:
    if not isinstance(s, str):
        raise TypeError(f"encode expects a str, got {type(s).__name__}")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"prompt text holds a lone surrogate {s[e.start]!r} at index {e.start}, which is not "
                         "valid Unicode: decode the source text with errors='replace' first") from None
    return s


def _frame(tok, ids: List[int], bos: bool, eos: bool) -> List[int]:
    return ([tok.bos_id] if bos else []) + ids + ([tok.eos_id] if eos else [])


class Tokenizer:
    """SentencePiece (LLaMA 1 and 2)."""

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        _check_file(path)
        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a SentencePiece model ({e}): use the tokenizer.model "
                             "that came with the checkpoint") from None
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()  # -1 when the model defines none

    @property
    def stop_ids(self) -> FrozenSet[int]:
        """Token ids that end a generation."""
        return frozenset({self.eos_id})

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        return _frame(self, self.sp.encode(_checked_text(s)), bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))


# Llama 3's pre-tokenizer: contractions, letter runs (with one leading non-letter), numbers of
# at most three digits, punctuation runs, newlines, and whitespace that leaves its last space to
# the word after it.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256


def llama3_special_tokens() -> List[str]:
    """The 256 special tokens Llama 3 (3.1 naming) places after the BPE ranks, in id order."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + LLAMA3_NUM_SPECIAL - len(named))]
    return named + reserved


def read_tiktoken_ranks(path: Path) -> Dict[bytes, int]:
    """Parse a tiktoken BPE file: one `base64(token) rank` pair per line."""
    ranks: Dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"{path} line {n} is not 'base64-token rank': the file is not a tiktoken "
                             "tokenizer.model; use the one that came with the checkpoint") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps: the file is damaged")
    return ranks


class Llama3Tokenizer:
    """tiktoken BPE (Llama 3): the file's ranks, then 256 special tokens."""

    def __init__(self, model_path: str | os.PathLike):
        import tiktoken

        path = Path(model_path)
        _check_file(path)
        ranks = read_tiktoken_ranks(path)
        specials = llama3_special_tokens()
        self.special_tokens: Dict[str, int] = {s: len(ranks) + i for i, s in enumerate(specials)}
        try:
            self.model = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                           special_tokens=self.special_tokens)
        except ValueError as e:
            raise ValueError(f"{path} is not a usable tiktoken BPE file ({e})") from None
        self.n_words: int = len(ranks) + len(specials)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int = -1
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.start_header_id: int = self.special_tokens["<|start_header_id|>"]
        self.end_header_id: int = self.special_tokens["<|end_header_id|>"]

    @property
    def stop_ids(self) -> FrozenSet[int]:
        return frozenset({self.eos_id, self.eot_id, self.eom_id})

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Special-token text in `s` is encoded as ordinary text, never as the special token."""
        ids = self.model.encode(_checked_text(s), allowed_special=set(), disallowed_special=())
        return _frame(self, ids, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        # A multi-byte character cut between tokens decodes to U+FFFD until its last byte arrives.
        return self.model.decode(list(ids), errors="replace")


AnyTokenizer = Union[Tokenizer, Llama3Tokenizer]

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+\r?\n")


def load_tokenizer(path: str | os.PathLike) -> AnyTokenizer:
    """The tokenizer for `path`: tiktoken when the file holds `base64 rank` lines, else SentencePiece."""
    path = Path(path)
    _check_file(path)
    with open(path, "rb") as f:
        head = f.read(128)
    return Llama3Tokenizer(path) if _TIKTOKEN_LINE.match(head) else Tokenizer(path)
