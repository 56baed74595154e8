"""Tokenizers: SentencePiece for LLaMA 1/2 `tokenizer.model` files, tiktoken for Llama 3's, and
Hugging Face `tokenizer.json` files (through the optional `tokenizers` package).

`load_tokenizer` picks the class from the file's contents. The classes share one interface:
`n_words`, `bos_id`, `eos_id`, `pad_id`, `stop_ids`, `encode(s, bos, eos)`, `decode(ids)` and
`default_chat_format`; those that speak Llama 3's chat format also have `special_tokens`,
`eot_id`, `eom_id`, `start_header_id` and `end_header_id`.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

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


def _known(ids: Sequence[int], n_words: int) -> List[int]:
    """The ids a tokenizer has a token for. A model's vocabulary may be padded beyond its tokenizer's
    (to a multiple of 64, or with reserved rows); a sampled id among the padding has no text."""
    return [i for i in ids if 0 <= i < n_words]


def _frame(tok, ids: List[int], bos: bool, eos: bool) -> List[int]:
    return ([tok.bos_id] if bos else []) + ids + ([tok.eos_id] if eos else [])


class Tokenizer:
    """SentencePiece (LLaMA 1 and 2)."""

    default_chat_format = "llama2"

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
        return self.sp.decode(_known(ids, self.n_words))

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for: a byte piece's byte, a piece's text with its leading space;
        a control token's (<s>, </s>) and <unk>'s are its piece; an id without a piece: none."""
        if not 0 <= i < self.n_words:
            return b""
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):
            return bytes([int(piece[3:5], 16)])
        if self.sp.is_control(i) or self.sp.is_unknown(i):
            return piece.encode()
        return piece.replace("\u2581", " ").encode()

    @property
    def special_ids(self) -> FrozenSet[int]:
        return frozenset(i for i in range(self.n_words) if self.sp.is_control(i) or self.sp.is_unknown(i))


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

    default_chat_format = "llama3"

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
        return self.model.decode(_known(ids, self.n_words), errors="replace")

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for (a special token's: its text; an id without a token: none)."""
        return self.model.decode_single_token_bytes(i) if 0 <= i < self.n_words else b""

    @property
    def special_ids(self) -> FrozenSet[int]:
        return frozenset(self.special_tokens.values())


def import_tokenizers():
    """The optional `tokenizers` package, or an ImportError that says how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise ImportError("tokenizer.json files need the `tokenizers` package: pip install 'llama[hf]'") from None
    return tokenizers


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): restore it from the model's download") from None
    return data if isinstance(data, dict) else {}


def _token_text(value) -> Optional[str]:
    """A token as tokenizer_config.json writes it: its text, or {"content": text, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> List[int]:
    """config.json / generation_config.json token ids: an int, a list of them, or null."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
_STRAY_BYTE = re.compile("[\udc80-\udcff]")  # how surrogateescape writes a byte that is not UTF-8
_SENTINEL = "\x00sentinel\x00"


class HFTokenizer:
    """A Hugging Face tokenizer.json, run by the `tokenizers` library, with this module's interface.

    BOS, EOS and pad come from tokenizer_config.json (or special_tokens_map.json) beside the file,
    else config.json's ids, else the usual names (`<s>`/`</s>`, Llama 3's). `stop_ids` adds
    generation_config.json's eos_token_id. A tokenizer with Llama 3's header tokens and
    <|eot_id|> speaks the Llama 3 chat format. Like the other classes, special-token text inside a
    string is encoded as ordinary text, and decoding drops SentencePiece-style control tokens but
    writes out Llama 3's.
    """

    def __init__(self, path: str | os.PathLike):
        tk = import_tokenizers()
        path = Path(path)
        _check_file(path)
        try:
            self.tk = tk.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust parser raises plain Exception
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({e}): use the one that came with "
                             "the checkpoint") from None
        self.tk.encode_special_tokens = True
        self.path = path
        folder = path.parent
        config = {**_read_config(folder / "special_tokens_map.json"), **_read_config(folder / "tokenizer_config.json")}
        model_config = _read_config(folder / "config.json")
        self.special_tokens: Dict[str, int] = {
            t.content: i for i, t in sorted(self.tk.get_added_tokens_decoder().items()) if t.special}
        self.n_words: int = self.tk.get_vocab_size(with_added_tokens=True)
        self.bos_id: int = self._find("bos", config, model_config, ("<s>", "<|begin_of_text|>"))
        self.eos_id: int = self._find("eos", config, model_config, ("</s>", "<|end_of_text|>"))
        pad = _token_text(config.get("pad_token"))
        self.pad_id: int = self._id_of(pad, "pad_token") if pad is not None else -1
        llama3 = [self.tk.token_to_id(t) for t in ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")]
        self.llama3_style = None not in llama3
        self.eot_id, self.start_header_id, self.end_header_id = llama3
        self.eom_id: Optional[int] = self.tk.token_to_id("<|eom_id|>")
        stops = {self.eos_id, *_ids(_read_config(folder / "generation_config.json").get("eos_token_id"))}
        if self.llama3_style:
            stops |= {i for i in (self.eot_id, self.eom_id) if i is not None}
        self._stop_ids = frozenset(stops)
        self._special_ids = frozenset(self.special_tokens.values())
        self._added_ids = frozenset(self.tk.get_added_tokens_decoder())
        self._byte_level = self.tk.decoder is not None and b"ByteLevel" in self.tk.decoder.__getstate__()
        byte_fallback = self.tk.decoder is not None and b"ByteFallback" in self.tk.decoder.__getstate__()
        self._byte_pieces: Dict[int, int] = {
            i: int(t[3:5], 16) for t, i in self.tk.get_vocab(with_added_tokens=False).items()
            if byte_fallback and _BYTE_PIECE.fullmatch(t)}
        unk = _token_text(config.get("unk_token"))
        self._unk_id = self.tk.token_to_id(unk) if byte_fallback and unk is not None else None

    def _id_of(self, token: str, what: str) -> int:
        i = self.tk.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.path.parent / 'tokenizer_config.json'} names {what} {token!r}, which "
                             f"{self.path.name} does not have: restore both from the model's download")
        return i

    def _find(self, kind: str, config: dict, model_config: dict, usual: Tuple[str, str]) -> int:
        named = _token_text(config.get(f"{kind}_token"))
        if named is not None:
            return self._id_of(named, f"{kind}_token")
        ids = [i for i in _ids(model_config.get(f"{kind}_token_id")) if 0 <= i < self.n_words]
        if ids:
            return ids[0]
        for token in usual:
            if self.tk.token_to_id(token) is not None:
                return self.tk.token_to_id(token)
        raise ValueError(f"{self.path}: cannot tell the {kind.upper()} token: no tokenizer_config.json beside it "
                         f"names {kind}_token, config.json has no {kind}_token_id, and there is no {usual[0]!r} "
                         f"or {usual[1]!r}: copy the model's tokenizer_config.json beside it")

    @property
    def default_chat_format(self) -> str:
        return "llama3" if self.llama3_style else "llama2"

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for: a byte piece's byte, a byte-level BPE token's bytes, a
        SentencePiece-style piece's text with its leading space, an added token's text."""
        if i in self._byte_pieces:
            return bytes([self._byte_pieces[i]])
        token = self.tk.id_to_token(i)
        if token is None:
            return b""
        if i in self._special_ids or i in self._added_ids:
            return token.encode()
        if self._byte_level:
            return bytes(_UNICODE_TO_BYTE.get(c, 0) for c in token)
        return token.replace("\u2581", " ").encode()

    @property
    def special_ids(self) -> FrozenSet[int]:
        return self._special_ids

    @property
    def stop_ids(self) -> FrozenSet[int]:
        return self._stop_ids

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        return _frame(self, self.tk.encode(_checked_text(s), add_special_tokens=False).ids, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        ids = _known(ids, self.n_words)
        skip = not self.llama3_style
        if not self._byte_pieces:
            return self.tk.decode(list(ids), skip_special_tokens=skip)
        # tokenizers' ByteFallback turns a whole run of byte pieces into U+FFFDs when any of it is
        # invalid; SentencePiece decodes the valid characters and replaces each stray byte, so the
        # runs reach the decoder as text. <unk> is kept for the decoder, which SentencePiece's
        # (and ours) writes as its surface.
        pieces: List[str] = []
        literal_first = False
        run = bytearray()
        for i in list(ids) + [None]:
            if i in self._byte_pieces:
                run.append(self._byte_pieces[i])
                continue
            if run:
                literal_first = literal_first or not pieces
                pieces.append(_STRAY_BYTE.sub("\ufffd", run.decode("utf-8", errors="surrogateescape")))
                run = bytearray()
            if i == self._unk_id:  # the decoder writes it out (ours: as SentencePiece's surface)
                literal_first = literal_first or not pieces
                pieces.append(self.tk.id_to_token(i))
            elif i is not None and not (skip and i in self._special_ids):
                pieces.append(self.tk.id_to_token(i))
        if not literal_first:
            return self.tk.decoder.decode(pieces)
        # SentencePiece drops the dummy prefix's space from a leading "▁" piece only, not from text
        return self.tk.decoder.decode([_SENTINEL] + pieces)[len(_SENTINEL):]


AnyTokenizer = Union[Tokenizer, Llama3Tokenizer, HFTokenizer]


def _byte_level_alphabet() -> Dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), mapped back to the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_UNICODE_TO_BYTE = _byte_level_alphabet()

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+\r?\n")
TOKENIZER_NAMES = ("tokenizer.model", "tokenizer.json")


def find_tokenizer(ckpt_dir: str | os.PathLike, tokenizer_path: Optional[str | os.PathLike] = None) -> str:
    """`tokenizer_path` when given, else the checkpoint folder's tokenizer.model, else its tokenizer.json
    (what many fine-tunes ship alone), else the folder itself, for which load_tokenizer names what is missing."""
    if tokenizer_path:
        return str(tokenizer_path)
    found = (os.path.join(ckpt_dir, name) for name in TOKENIZER_NAMES)
    return next((path for path in found if os.path.isfile(path)), str(ckpt_dir))


def load_tokenizer(path: str | os.PathLike) -> AnyTokenizer:
    """The tokenizer for `path`: Hugging Face's for a tokenizer.json, tiktoken when the file holds
    `base64 rank` lines, else SentencePiece."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} has no tokenizer: neither {TOKENIZER_NAMES[0]} (SentencePiece or "
                                f"tiktoken) nor {TOKENIZER_NAMES[1]} (Hugging Face) is there; copy the "
                                "checkpoint's tokenizer into it or pass --tokenizer_path")
    _check_file(path)
    with open(path, "rb") as f:
        head = f.read(128)
    if head.lstrip().startswith(b"{"):
        return HFTokenizer(path)
    return Llama3Tokenizer(path) if _TIKTOKEN_LINE.match(head) else Tokenizer(path)
