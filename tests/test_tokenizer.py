import pytest

from conftest import asset
from llama import Tokenizer


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
