"""Streaming: pieces join up to the final text exactly, never splitting a character."""
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import llama.runner
from conftest import ASSETS, run_main, run_python, torchrun
from llama.commands import generate
from llama.text import TextStream, check_stop, decode_continuation
from llama.tokenizer import Tokenizer, load_tokenizer
from test_tokenizer import write_tiny_tiktoken

# emoji and rare CJK go through byte-fallback pieces in SentencePiece and split bytes in tiktoken
TEXTS = ["Once upon a time 🦙 there was", " 世界 and 鼹鼠 met 🐿️🦙!", "naïve café ∑ 😀😀 end", "  two  spaces"]


def stream_tokens(tokenizer, context, tokens, stop=()):
    s = TextStream(tokenizer, context, stop)
    pieces = []
    for t in tokens:
        stopped = s.push(t)
        pieces.append(s.pop())
        if stopped:
            break
    s.finish()
    pieces.append(s.pop())
    return pieces, s.text


def tokenizers(tiny_ckpt, tmp_path):
    yield Tokenizer(tiny_ckpt / "tokenizer.model")
    yield load_tokenizer(write_tiny_tiktoken(tmp_path / "tiktoken.model"))
    for name in ["llama_tokenizer.model", "tok512.model", "llama3_tokenizer.model"]:
        if (ASSETS / name).is_file():  # the real tokenizers too, where present
            yield load_tokenizer(ASSETS / name)


def test_pieces_are_whole_characters_and_join_to_the_text(tiny_ckpt, tmp_path):
    for tok in tokenizers(tiny_ckpt, tmp_path):
        for prefix in ["", "Hello", "雪 🦙"]:
            context = tok.encode(prefix, bos=True, eos=False)
            for text in TEXTS:
                tokens = tok.encode(prefix + text, bos=True, eos=False)[len(context):]
                if tok.encode(prefix + text, bos=True, eos=False)[: len(context)] != context:
                    continue  # the tokenizer merged across the boundary
                pieces, final = stream_tokens(tok, context, tokens)
                assert "".join(pieces) == final == decode_continuation(tok, context, tokens)
                assert not any("\ufffd" in p for p in pieces), (type(tok).__name__, pieces)
                assert sum(1 for p in pieces if p) > 3  # released as it goes, not all at the end


@pytest.mark.parametrize("every", [1, 3, 7, 1000])
def test_text_read_every_few_tokens_is_the_text_read_at_each(tiny_ckpt, tmp_path, every):
    """Without stop strings the tokens wait to be decoded until the text is read: pieces read every few tokens (or
    once, at the end) join to the same text as pieces read after each token, and hold no broken character."""
    for tok in tokenizers(tiny_ckpt, tmp_path):
        for text in TEXTS:
            context = [tok.bos_id]
            tokens = tok.encode(text, bos=False, eos=False)
            s, pieces = TextStream(tok, context), []
            for i, t in enumerate(tokens, 1):
                assert s.push(t) is False
                if i % every == 0:
                    pieces.append(s.pop())
            s.finish()
            pieces.append(s.pop())
            assert "".join(pieces) == s.text == stream_tokens(tok, context, tokens)[1]
            assert not any("\ufffd" in p for p in pieces), (type(tok).__name__, pieces)


def test_streamed_text_holds_back_a_possible_stop_string(tiny_ckpt):
    tok = Tokenizer(tiny_ckpt / "tokenizer.model")
    tokens = tok.encode("the cat ran. the cat sat. the dog", bos=False, eos=False)
    pieces, final = stream_tokens(tok, [tok.bos_id], tokens, stop=["cat sat", "dog"])
    assert final == "".join(pieces) == "the cat ran. the "
    assert not any("cat s" in p for p in pieces)


_TOKENIZERS = {}


def tiny_tokenizer(path):
    return _TOKENIZERS.setdefault(path, Tokenizer(path / "tokenizer.model"))


@settings(deadline=None)  # the number of examples comes from the hypothesis profile
@given(st.lists(st.integers(0, 511), max_size=24), st.lists(st.integers(0, 511), max_size=6))
def test_any_token_sequence_streams_to_its_decoded_text(tiny_ckpt, tokens, context):
    tok = tiny_tokenizer(tiny_ckpt)
    pieces, final = stream_tokens(tok, [tok.bos_id] + context, tokens)
    assert "".join(pieces) == final == decode_continuation(tok, [tok.bos_id] + context, tokens)


class PieceTokenizer:
    """A tokenizer whose tokens are the given strings (ids index them): stop-string tests choose the text exactly."""

    def __init__(self, pieces=None):
        self.pieces = pieces

    def decode(self, ids):
        return "".join(self.pieces[i] if self.pieces else chr(i) for i in ids)


def reference_cut(text, stops):
    """Where the text ends: before the stop string that appears first, as str.find sees the whole text."""
    starts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(starts)] if starts else text


@settings(deadline=None)
@given(st.text("abc", max_size=30), st.lists(st.text("abc", min_size=1, max_size=5), min_size=1, max_size=6),
       st.integers(1, 4))
def test_stop_strings_cut_where_the_first_one_appears(text, stops, chunk):
    """Overlapping stop strings on a 3-letter alphabet, the text arriving `chunk` characters at a time (a token
    of several characters): the text ends before the earliest stop string, and nothing after it is released."""
    pieces = [text[i : i + chunk] for i in range(0, len(text), chunk)]
    s = TextStream(PieceTokenizer(pieces), [], stops)
    released, end = "", len(text)
    for i in range(len(pieces)):
        s.push(i)
        released += s.pop()
        if s.stopped:
            end = (i + 1) * chunk
            break
        # what is held back is exactly the longest tail that begins a stop string
        held = next((k for k in range(len(s.text), 0, -1) if any(x.startswith(s.text[-k:]) for x in stops)), 0)
        assert released == s.text[: len(s.text) - held]
    s.finish()
    released += s.pop()
    assert released == s.text == reference_cut(text[:end], stops)


def test_stop_strings_are_bounded_in_number_and_length():
    """Issue 18, item 1: 10,000 stop strings of 90 characters once slowed every other stream for minutes."""
    assert check_stop(["a"] * 16) == ["a"] * 16 and check_stop("x" * 256) == ["x" * 256]
    with pytest.raises(ValueError, match="stop holds 17 strings: at most 16 stop strings"):
        check_stop(["a"] * 17)
    with pytest.raises(ValueError, match=r"stop\[1\] is 257 characters long: a stop string may have at most 256"):
        check_stop(["ok", "x" * 257])
    with pytest.raises(ValueError, match="stop holds 10000 strings") as info:
        check_stop(["y" * 90] * 10_000)
    assert len(str(info.value)) < 200  # the error does not echo the request back


def calls_per_token(stops, text):
    """Python and C function calls made by pushing `text` one character a token and polling after each."""
    s = TextStream(PieceTokenizer(), [], stops)
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        for ch in text:
            s.push(ord(ch))
            s.ready()
            s.pop()
    finally:
        sys.setprofile(None)
    assert not s.stopped
    return calls / len(text)


def test_the_stop_check_costs_the_same_for_1_or_16_stop_strings():
    """Issue 18, item 1: the check per token (and per poll) must not grow with the number of stop strings. Each
    stop string has the longest length allowed and shares a short tail with the text at every step, the worst
    case for a scan of the text's tail; one automaton reads each character once, whatever the stop strings."""
    text = "ab" * 300
    one = calls_per_token(["a" * 255 + "c"], text)
    sixteen = calls_per_token(["a" * 255 + chr(ord("c") + i) for i in range(16)], text)
    assert sixteen <= one * 1.1, (one, sixteen)


def test_stream_equals_text_completion(tiny_llama):
    prompts = ["Once upon a time 🦙", "世界 and", "naïve café", "A"]
    kwargs = dict(temperature=0.9, top_p=0.95, max_gen_len=24)
    tiny_llama.generator.manual_seed(5)
    final = tiny_llama.text_completion(prompts, **kwargs)
    tiny_llama.generator.manual_seed(5)
    joined = [""] * len(prompts)
    for pieces in tiny_llama.stream(prompts, **kwargs):
        joined = [j + p for j, p in zip(joined, pieces)]
    assert joined == [f["generation"] for f in final]
    tiny_llama.generator.manual_seed(5)
    tokens, _ = tiny_llama.generate([tiny_llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts], **kwargs)
    for p, t, j in zip(prompts, tokens, joined):
        assert j == tiny_llama.decode_continuation(tiny_llama.tokenizer.encode(p, bos=True, eos=False), t)


def test_generated_emoji_and_cjk_stream_whole(tiny_llama, monkeypatch):
    """Force the sampler to emit the tokens of a text with byte-fallback pieces."""
    tok = tiny_llama.tokenizer
    text = " 🦙 世界 鼹 😀 done"
    script = iter(tok.encode("Hi" + text, bos=False, eos=False)[len(tok.encode("Hi", bos=False, eos=False)):])
    monkeypatch.setattr(llama.runner, "sample", lambda logits, *a: logits.new_full(
        logits.shape[:1], next(script, tok.eos_id), dtype=torch.long))
    pieces = [p[0] for p in tiny_llama.stream(["Hi"], temperature=1.0, max_gen_len=40)]  # the sampler runs
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert "🦙" in pieces or any(p.endswith("🦙") for p in pieces)


def test_stream_checks_arguments_before_returning(tiny_llama):
    with pytest.raises(ValueError, match="temperature=-1"):
        tiny_llama.stream(["a"], temperature=-1)


def test_llama_generate_stream_prints_the_same_text(tiny_ckpt):
    args = ["--ckpt_dir", tiny_ckpt, "--prompts", "Once 🦙", "The cat", "--temperature", "0", "--max_gen_len", "12"]
    plain, streamed = run_main(generate.main, *args), run_main(generate.main, *args, "--stream")
    assert plain[0] == streamed[0] == 0, plain[2] + streamed[2]
    assert streamed[1] == plain[1] and plain[1].startswith("Once 🦙")


@pytest.mark.slow
def test_example_py_stream_prints_the_same_text(tiny_ckpt):
    args = ["example.py", "--ckpt_dir", str(tiny_ckpt), "--prompts", "Once 🦙", "The cat", "--temperature", "0",
            "--max_gen_len", "12"]
    plain = run_python(*args)
    streamed = run_python(*args, "--stream")
    assert plain.returncode == streamed.returncode == 0, plain.stderr + streamed.stderr
    assert streamed.stdout == plain.stdout and plain.stdout.startswith("Once 🦙")


@pytest.mark.slow
def test_example_py_stream_on_two_processes(tiny_ckpt, tiny_ckpt2):
    args = ["--prompts", "The cat", "A", "--temperature", "0", "--max_gen_len", "8", "--stop", "e"]
    one = run_python("example.py", "--ckpt_dir", str(tiny_ckpt), *args)
    two = torchrun(2, "example.py", "--ckpt_dir", str(tiny_ckpt2), *args, "--stream")
    assert one.returncode == two.returncode == 0, one.stderr + two.stderr[-3000:]
    assert two.stdout == one.stdout  # printed once, by rank 0
