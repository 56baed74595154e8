"""The fields of a SentencePiece model file that a Hugging Face tokenizer.json needs, read from its protobuf.

A `tokenizer.model` is a serialized `sentencepiece.ModelProto`. SentencePieceProcessor exposes the
pieces but not the normalizer settings, and the protobuf package is not a dependency, so this reads
the wire format directly: only the handful of fields below, each with the proto's default.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Tuple, Union

# ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType
UNIGRAM, BPE = 1, 2

_Value = Union[int, bytes]


@dataclass
class Piece:
    piece: str
    score: float = 0.0
    type: int = NORMAL


@dataclass
class SentencePieceModel:
    pieces: List[Piece] = field(default_factory=list)
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_surface: str = " \u2047 "
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    has_denormalizer: bool = False  # a denormalizer rewrites decoded text; tokenizer.json has no equivalent


def _varint(buf: bytes, pos: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[Tuple[int, _Value]]:
    """(field number, value) pairs of one message: ints for varints and fixed32, bytes for the rest."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = struct.unpack("<I", buf[pos:pos + 4])[0], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        yield number, value


def _int32(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _piece(buf: bytes) -> Piece:
    p = Piece("")
    for number, v in _fields(buf):
        if number == 1:
            p.piece = v.decode("utf-8")
        elif number == 2:
            p.score = struct.unpack("<f", struct.pack("<I", v))[0]
        elif number == 3:
            p.type = v
    return p


_TRAINER = {3: "model_type", 35: "byte_fallback", 24: "treat_whitespace_as_suffix", 44: "unk_surface"}
_NORMALIZER = {1: "normalizer_name", 2: "precompiled_charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
               5: "escape_whitespaces"}


def _set(model: SentencePieceModel, names: Dict[int, str], buf: bytes) -> None:
    for number, v in _fields(buf):
        name = names.get(number)
        if name is None:
            continue
        default = getattr(model, name)
        if isinstance(default, bool):
            v = bool(v)
        elif isinstance(default, str):
            v = v.decode("utf-8")
        elif isinstance(default, int):
            v = _int32(v)
        setattr(model, name, v)


def read_sentencepiece_model(data: bytes) -> SentencePieceModel:
    """The pieces, trainer and normalizer settings of a serialized ModelProto (the bytes of a tokenizer.model)."""
    model = SentencePieceModel()
    try:
        for number, v in _fields(data):
            if number == 1:
                model.pieces.append(_piece(v))
            elif number == 2:
                _set(model, _TRAINER, v)
            elif number == 3:
                _set(model, _NORMALIZER, v)
            elif number == 5:
                model.has_denormalizer = any(n == 2 and value for n, value in _fields(v))
    except (ValueError, UnicodeDecodeError, AttributeError, struct.error) as e:
        raise ValueError(f"not a SentencePiece model proto ({e})") from None
    return model
