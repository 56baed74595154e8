import base64
import re
from collections import Counter

import pytest

from conftest import asset
from llama.tiny import _corpus
from llama.tokenizer import Llama3Tokenizer, Tokenizer, load_tokenizer


def test_real_llama_tokenizer_ids():
    tok = Tokenizer(asset("llama_tokenizer.model"))
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, -1)
    assert tok.encode("Hello world", bos=True, eos=False) == [1, 15043, 3186]
    assert tok.encode("I believe the meaning of life is", bos=True, eos=True) == [
        1, 306, 4658, 278, 6593, 310, 2834, 338, 2]
    # digits split one by one, emoji through byte fallback, CJK as whole pieces
    assert tok.encode("1234 emoji 🦙 世界", bos=False, eos=False) == [
        29871, 29896, 29906, 29941, 29946, 953, 29877, 2397, 29871, 243, 162, 169, 156, 29871, 30793, 30967]
    assert tok.decode([1, 15043, 3186, 2]) == "Hello world"


def test_tiny_tokenizer_round_trips_unicode(tiny_ckpt):
    tok = Tokenizer(tiny_ckpt / "tokenizer.model")
    assert tok.pad_id == -1 and tok.bos_id == 1 and tok.eos_id == 2
    for text in ["The cat sat.", "émoji 🦙 and 世界", "tabs\tand  spaces"]:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert all(0 <= i < tok.n_words for i in ids)
        assert tok.decode(ids) == " ".join(text.split()) if "  " in text else tok.decode(ids) == text


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(junk)


def write_tiny_tiktoken(path, n_merges: int = 200):
    """A byte-level BPE file in Llama 3's format (`base64 rank` lines): the 256 bytes, then merges
    learned on llama.tiny's corpus. With 256 special tokens after them it has 712 ids."""
    words = Counter(w.encode() for line in _corpus(0, 500) for w in re.findall(r" ?\w+| ?[^\w\s]+|\s+", line))
    splits = {w: [bytes([b]) for b in w] for w in words}
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(n_merges):
        pairs = Counter()
        for w, parts in splits.items():
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += words[w]
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for parts in splits.values():
            i = 0
            while i < len(parts) - 1:
                if parts[i] == a and parts[i + 1] == b:
                    parts[i : i + 2] = [a + b]
                i += 1
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


LLAMA3_SENTENCES = {
    "Hello world": [9906, 1917],
    "I believe the meaning of life is": [40, 4510, 279, 7438, 315, 2324, 374],
    "1234 emoji 🦙 世界": [4513, 19, 43465, 11410, 99, 247, 127365],
    "It's  spaced\n\nout!!! 12345": [2181, 596, 220, 64928, 271, 412, 12340, 220, 4513, 1774],
}


def test_real_llama3_tokenizer_ids():
    tok = load_tokenizer(asset("llama3_tokenizer.model"))
    assert isinstance(tok, Llama3Tokenizer)
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (128256, 128000, 128001, -1)
    assert (tok.start_header_id, tok.end_header_id, tok.eom_id, tok.eot_id) == (128006, 128007, 128008, 128009)
    assert tok.stop_ids == {128001, 128008, 128009}
    assert tok.special_tokens["<|reserved_special_token_0|>"] == 128002
    assert tok.special_tokens["<|reserved_special_token_247|>"] == 128255
    for text, ids in LLAMA3_SENTENCES.items():
        assert tok.encode(text, bos=False, eos=False) == ids
        assert tok.decode(ids) == text
    assert tok.encode("Hi", bos=True, eos=True) == [128000, 13347, 128001]
    # special-token text in user input stays text
    assert tok.encode("<|eot_id|>", bos=False, eos=False) == [27, 91, 68, 354, 851, 91, 29]
    assert tok.decode([128006, 882, 128007]) == "<|start_header_id|>user<|end_header_id|>"


def test_tokenizer_class_follows_the_file_contents(tmp_path, tiny_ckpt):
    tiny3 = write_tiny_tiktoken(tmp_path / "tokenizer.model")
    tok = load_tokenizer(tiny3)
    assert isinstance(tok, Llama3Tokenizer) and tok.n_words == 712 and tok.bos_id == 456
    for text in ["The cat sat on the mat.", "émoji 🦙 and 世界\n\n 12345"]:
        ids = tok.encode(text, bos=False, eos=False)
        assert tok.decode(ids) == text and all(0 <= i < 456 for i in ids)
    assert len(tok.encode("the happy dog", bos=False, eos=False)) < len("the happy dog")  # merges apply
    assert isinstance(load_tokenizer(tiny_ckpt / "tokenizer.model"), Tokenizer)


def test_bad_tiktoken_files(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("IQ== 0\nIg== one\n")
    with pytest.raises(ValueError, match="line 2 is not 'base64-token rank'"):
        load_tokenizer(bad)
    bad.write_text("IQ== 0\nIg== 2\n")
    with pytest.raises(ValueError, match="without gaps"):
        load_tokenizer(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
