"""Hugging Face tokenizer files for our tokenizers, so `transformers.AutoTokenizer` gives our ids.

`tokenizer.json` is built with the `tokenizers` library: from the SentencePiece model proto (LLaMA 1
and 2) or from the tiktoken ranks and special tokens (Llama 3). Beside it go `tokenizer_config.json`
(class, BOS/EOS, the chat template of the chat format: the tokenizer's, or the one the export names),
`special_tokens_map.json` and
`generation_config.json` (the ids generation starts, stops and pads with).

How the SentencePiece pipeline is rebuilt:
- normalizer: the model's precompiled character map (when it has one), the extra-whitespace
  removal it asks for, the dummy-prefix "▁" and spaces as "▁". The normalizer runs on each stretch
  of text between special tokens, so text after `<s>` gets its own dummy prefix: the same ids as
  encoding each stretch on its own, which is how Meta's code builds chat prompts (`legacy=True` in
  transformers' terms).
- model: BPE over the whole string, byte fallback. SentencePiece merges the adjacent pair whose
  joined piece scores highest, leftmost first among equals; a BPE merge list ranks pairs, so every
  split of a piece into two pieces becomes a merge, ranked by the joined piece's score, and among
  equal scores (LLaMA's runs of "▁") the longer left part first, which is what leftmost-first
  does on a run.
- decoder: <unk> as SentencePiece's surface (" ⁇ "), "▁" back to spaces, byte pieces to UTF-8, the
  dummy prefix's space dropped.

tiktoken's BPE is the same rule with ranks for scores (lowest first); a piece that is a whole
token is taken as is (`ignore_merges`), as tiktoken does.

Where tokenizers cannot follow (upstream): its ByteFallback decoder writes U+FFFD for every byte of
a run that is not valid UTF-8, where SentencePiece keeps the valid characters (only token ids that
are not an encoding of text have such runs; llama.tokenizer.HFTokenizer decodes them as
SentencePiece does), and its Precompiled normalizer maps whole graphemes, dropping what follows a
mapped prefix (huggingface/tokenizers#2116): this concerns models with a character map such as
nmt_nfkc, not LLaMA's, whose rule is identity.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from llama.sp_model import BPE, BYTE, CONTROL, NORMAL, UNKNOWN, SentencePieceModel, read_sentencepiece_model
from llama.tokenizer import (LLAMA3_PATTERN, AnyTokenizer, Llama3Tokenizer, find_tokenizer, import_tokenizers,
                             load_tokenizer, llama3_special_tokens, read_tiktoken_ranks)

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
GENERATION_CONFIG = "generation_config.json"
# Loads tokenizer.json as it is (transformers 5: TokenizersBackend); LlamaTokenizer would rebuild the
# pipeline from its own settings and lose the model's normalizer.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
_ALL_LEADING = 1 << 16  # a Strip decoder count that means every leading space


def unsupported_sentencepiece(model: SentencePieceModel) -> Optional[str]:
    """Why `model` cannot become an exact tokenizer.json, or None when it can."""
    if model.model_type != BPE:
        return "it is not a BPE model (only BPE models, like LLaMA's, are converted)"
    kinds = {p.type for p in model.pieces} - {NORMAL, UNKNOWN, CONTROL, BYTE}
    if kinds:
        return ("it has user-defined or unused pieces, which SentencePiece matches in ways tokenizer.json "
                "cannot express")
    if model.treat_whitespace_as_suffix or model.has_denormalizer:
        return "it puts whitespace at the end of pieces or denormalizes its output"
    if not any(p.type == UNKNOWN for p in model.pieces):
        return "it has no unknown piece"
    return None


def _sentencepiece_merges(model: SentencePieceModel) -> List[Tuple[str, str]]:
    normal = {p.piece: p.score for p in model.pieces if p.type == NORMAL}
    ranked = []
    for piece, score in normal.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in normal and right in normal:
                ranked.append((-score, -len(left), left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def sentencepiece_tokenizer_json(data: bytes):
    """A `tokenizers.Tokenizer` that encodes and decodes as SentencePiece model `data` (a tokenizer.model's
    bytes) does, with `<s>` prepended by its post-processor. Raises ValueError for models it cannot match."""
    tk = import_tokenizers()
    from tokenizers import AddedToken, Regex, normalizers, processors
    from tokenizers.models import BPE as BPEModel

    model = read_sentencepiece_model(data)
    reason = unsupported_sentencepiece(model)
    if reason is not None:
        raise ValueError(f"the SentencePiece model cannot be written as tokenizer.json: {reason}")
    if model.precompiled_charsmap:
        log.warning("the SentencePiece model normalizes text with a character map (%s): in tokenizer.json a "
                    "combining mark after a mapped character can be dropped (huggingface/tokenizers#2116)",
                    model.normalizer_name or "custom")
    vocab = {p.piece: i for i, p in enumerate(model.pieces)}
    unk = next(p.piece for p in model.pieces if p.type == UNKNOWN)
    tok = tk.Tokenizer(BPEModel(vocab=vocab, merges=_sentencepiece_merges(model), unk_token=unk, fuse_unk=True,
                                byte_fallback=model.byte_fallback))
    steps = [normalizers.Precompiled(model.precompiled_charsmap)] if model.precompiled_charsmap else []
    space = "\u2581" if model.escape_whitespaces else " "
    if model.remove_extra_whitespaces:  # leading spaces go, inner runs shrink to one
        steps += [normalizers.Replace(Regex(r"\A +"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if model.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if model.escape_whitespaces:
        steps.append(normalizers.Replace(" ", space))
    if model.remove_extra_whitespaces:
        # SentencePiece trims the end after escaping, so a "▁" typed in the text goes there too
        steps.append(normalizers.Replace(Regex(f"{space}+\\z"), ""))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    tok.decoder = _sentencepiece_decoder(model, unk)
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in model.pieces if p.type in (UNKNOWN, CONTROL)])
    bos = _bos_piece(model)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    return tok


def _sentencepiece_decoder(model: SentencePieceModel, unk: str):
    from tokenizers import decoders

    # <unk> reads as its surface (" ⁇ "), as SentencePiece writes it, when special tokens are kept
    parts = [decoders.Replace(unk, model.unk_surface)]
    if model.escape_whitespaces:
        parts.append(decoders.Replace("\u2581", " "))
    parts += [decoders.ByteFallback(), decoders.Fuse()]
    if model.add_dummy_prefix or model.remove_extra_whitespaces:
        # SentencePiece drops the dummy prefix's space; a model that collapses whitespace has no
        # "▁▁" pieces, and there it drops every leading "▁" piece's space.
        parts.append(decoders.Strip(" ", _ALL_LEADING if model.remove_extra_whitespaces else 1, 0))
    return decoders.Sequence(parts)


def _bos_piece(model: SentencePieceModel) -> Optional[str]:
    return next((p.piece for p in model.pieces if p.type == CONTROL and p.piece == "<s>"), None)


def _byte_chars() -> List[str]:
    """GPT-2's byte-level alphabet: the printable Latin-1 bytes stand for themselves, every other byte
    for a character from U+0100 up, in byte order."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(0x100 + extra))
            extra += 1
    return chars


def _tiktoken_merges(ranks: Dict[bytes, int], text: Dict[bytes, str]) -> List[Tuple[str, str]]:
    ranked = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                ranked.append((rank, -i, left, right))
    ranked.sort()
    return [(text[left], text[right]) for _, _, left, right in ranked]


def tiktoken_tokenizer_json(path: Union[str, os.PathLike]):
    """A `tokenizers.Tokenizer` for Llama 3's tiktoken file at `path`: its ranks, its pre-tokenizer, the
    256 special tokens after the ranks, `<|begin_of_text|>` prepended by its post-processor."""
    tk = import_tokenizers()
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE as BPEModel

    ranks = read_tiktoken_ranks(Path(path))
    chars = _byte_chars()
    text = {token: "".join(chars[b] for b in token) for token in ranks}
    vocab = {text[token]: rank for token, rank in ranks.items()}
    tok = tk.Tokenizer(BPEModel(vocab=vocab, merges=_tiktoken_merges(ranks, text), ignore_merges=True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = llama3_special_tokens()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = specials[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, len(ranks))])
    return tok


def tokenizer_json(path: Union[str, os.PathLike], tok: Optional[AnyTokenizer] = None):
    """The `tokenizers.Tokenizer` for the tokenizer.model at `path` (SentencePiece or tiktoken); `tok`
    is that file loaded, when the caller has it."""
    if isinstance(tok or load_tokenizer(path), Llama3Tokenizer):
        return tiktoken_tokenizer_json(path)
    return sentencepiece_tokenizer_json(Path(path).read_bytes())


def _token(tok: AnyTokenizer, i: int) -> Optional[str]:
    if i < 0:
        return None
    if isinstance(tok, Llama3Tokenizer):
        return next(s for s, j in tok.special_tokens.items() if j == i)
    return tok.sp.id_to_piece(i)


def tokenizer_config(tok: AnyTokenizer, chat_format: Optional[str] = None) -> dict:
    """tokenizer_config.json for `tok`: its special tokens, BOS added as our encode(bos=True) does, and
    the chat template of `chat_format` (default: the tokenizer's)."""
    from llama.chat_format import check_chat_format
    from llama.chat_templates import CHAT_TEMPLATES

    name = check_chat_format(chat_format, tok)
    config = {
        "tokenizer_class": TOKENIZER_CLASS,
        "bos_token": _token(tok, tok.bos_id),
        "eos_token": _token(tok, tok.eos_id),
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decoded text exactly as the tokenizer gives it
        "model_input_names": ["input_ids", "attention_mask"],
    }
    if not isinstance(tok, Llama3Tokenizer):
        config["unk_token"] = _token(tok, tok.sp.unk_id())
        # Text after a special token gets SentencePiece's dummy prefix, as if encoded on its own.
        config["legacy"] = True
    if tok.pad_id >= 0:
        config["pad_token"] = _token(tok, tok.pad_id)
    config["chat_template"] = CHAT_TEMPLATES[name]
    return config


def _set_chat_template(path: Path, chat_format: str) -> None:
    from llama.chat_templates import CHAT_TEMPLATES

    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    _dump(path, {**config, "chat_template": CHAT_TEMPLATES[chat_format]})


def special_tokens_map(config: dict) -> dict:
    return {k: v for k, v in config.items() if k in ("bos_token", "eos_token", "unk_token", "pad_token")}


def generation_config(tok: AnyTokenizer) -> dict:
    """generation_config.json: generation stops at every id ours stops at (Llama 3: <|end_of_text|>,
    <|eom_id|> and <|eot_id|>) and pads with the pad id, or EOS when there is none, as transformers
    would anyway."""
    stops = sorted(tok.stop_ids)
    return {"bos_token_id": tok.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
            "pad_token_id": tok.pad_id if tok.pad_id >= 0 else tok.eos_id}


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(tokenizer_path: Union[str, os.PathLike], out_dir: Union[str, os.PathLike],
                          chat_format: Optional[str] = None) -> List[str]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and generation_config.json
    for the tokenizer.model at `tokenizer_path` into `out_dir`; the names written. Raises ValueError
    for a SentencePiece model tokenizer.json cannot match, ImportError without `tokenizers`."""
    out = Path(out_dir)
    tok = load_tokenizer(tokenizer_path)
    backend = tokenizer_json(tokenizer_path, tok)
    config = tokenizer_config(tok, chat_format)  # everything is built before the first file is written
    backend.save(str(out / "tokenizer.json"))
    _dump(out / "tokenizer_config.json", config)
    _dump(out / "special_tokens_map.json", special_tokens_map(config))
    _dump(out / GENERATION_CONFIG, generation_config(tok))
    return [*TOKENIZER_FILES, GENERATION_CONFIG]


def check_export_chat_format(src: Path, chat_format: Optional[str]) -> None:
    """Refuse, before anything is written, a `chat_format` for exporting folder `src` that is unknown,
    that its tokenizer cannot speak, or that there is no tokenizer to carry."""
    if chat_format is None:
        return
    from llama.chat_format import check_chat_format, check_chat_format_name

    check_chat_format_name(chat_format)
    path = Path(find_tokenizer(src))
    if not path.is_file():
        raise ValueError(f"--chat_format {chat_format}: {src} has no tokenizer.model or tokenizer.json to carry "
                         "the chat template; copy the tokenizer into it first")
    check_chat_format(chat_format, load_tokenizer(path))


def export_tokenizer(src: Path, dst: Path, chat_format: Optional[str] = None) -> None:
    """Give Hugging Face folder `dst` the tokenizer of checkpoint folder `src`: its tokenizer.model, and
    the Hugging Face files: copied when `src` has a tokenizer.json (a Hugging Face folder's own are
    kept as they are), else built from tokenizer.model. The chat template is `chat_format`'s when
    given (see check_export_chat_format); else a copied one is kept, and a built one is the
    tokenizer's default format's."""
    model = src / "tokenizer.model"
    if model.is_file():
        shutil.copyfile(model, dst / "tokenizer.model")
    if (src / "tokenizer.json").is_file():
        for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
            if (src / name).is_file():
                shutil.copyfile(src / name, dst / name)
        if not (src / GENERATION_CONFIG).is_file():
            _dump(dst / GENERATION_CONFIG, generation_config(load_tokenizer(src / "tokenizer.json")))
        if chat_format is not None:
            _set_chat_template(dst / "tokenizer_config.json", chat_format)
        return
    if not model.is_file():
        log.warning("%s has no tokenizer.model or tokenizer.json: copy the tokenizer into %s before using it",
                    src, dst)
        return
    try:
        write_tokenizer_files(model, dst, chat_format)
    except (ImportError, ValueError) as e:
        log.warning("%s: only tokenizer.model written, no Hugging Face tokenizer files (AutoTokenizer will not "
                    "load it): %s", dst, e)
