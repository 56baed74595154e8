"""llama-chat (chat.py) driven through piped stdin: in this process, and as a user runs it on one process and two."""
import io

import pytest

from conftest import run_main, run_python, torchrun
from llama import Llama
from llama.commands import chat
from llama.commands.chat import fit_dialog
from llama.chat_format import strip_reserved_tags

ARGS = ["--temperature", "0", "--max_gen_len", "10", "--max_seq_len", "128", "--system", "Be brief."]


def expected_transcript(g, lines, system="Be brief.", max_gen_len=10):
    """What chat.py should print for `lines`, from chat_completion on the growing dialog."""
    out, history = [], []
    for line in lines:
        history.append({"role": "user", "content": line})
        dialog = [{"role": "system", "content": system}] + history
        answer = g.chat_completion([dialog], temperature=0, max_gen_len=max_gen_len)[0]["generation"]["content"]
        history.append({"role": "assistant", "content": answer})
        out.append(f"> {line}\n{answer}\n")
    return "".join(out) + "> \n"


@pytest.fixture(scope="module")
def chat_llama(tiny_ckpt):
    return Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=128, max_batch_size=1)


@pytest.fixture(scope="module")
def two_turns(chat_llama):
    lines = ["Hello there, who are you?", "Tell me a story 🦙"]
    return lines, expected_transcript(chat_llama, lines)


@pytest.mark.slow
def test_two_turn_session(tiny_ckpt, two_turns):
    lines, expected = two_turns
    proc = run_python("chat.py", "--ckpt_dir", str(tiny_ckpt), *ARGS, input="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected


@pytest.mark.slow
def test_two_turn_session_on_two_processes(tiny_ckpt2, two_turns):
    lines, expected = two_turns
    proc = torchrun(2, "chat.py", "--ckpt_dir", str(tiny_ckpt2), *ARGS, input="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == expected  # rank 0 alone prints, rank 1 followed the broadcast lines


def chat_in_process(monkeypatch, *argv, stdin: str):
    """llama-chat in this process, its keyboard `stdin` (piped: each line is echoed): (status, stdout, stderr)."""
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return run_main(chat.main, *argv)


@pytest.mark.slow
def test_reset_and_exit(tiny_ckpt, chat_llama, monkeypatch):
    status, out, err = chat_in_process(monkeypatch, "--ckpt_dir", tiny_ckpt, *ARGS,
                                       stdin="Hello\n/reset\nHello\n/exit\nnever read\n")
    assert status == 0, err
    first = expected_transcript(chat_llama, ["Hello"]).removesuffix("> \n")
    assert out == first + "> /reset\n(history cleared)\n" + first + "> /exit\n"


@pytest.mark.slow
def test_long_history_drops_the_oldest_exchanges(tiny_ckpt, monkeypatch):
    lines = [f"Message {i}: the happy dog ran to the park with a red ball" for i in range(8)]
    lines.insert(4, "word " * 200)  # longer than max_seq_len: refused, session goes on
    status, out, err = chat_in_process(monkeypatch, "--ckpt_dir", tiny_ckpt, "--temperature", "0", "--max_gen_len",
                                       "10", "--max_seq_len", "64", stdin="\n".join(lines) + "\n")
    assert status == 0, err
    assert out.count("(not sent: the message does not fit in --max_seq_len=64") == 1
    assert out.count("> Message") == 8


def test_an_answer_that_reaches_max_seq_len_gets_a_note(tiny_ckpt, monkeypatch):
    status, out, err = chat_in_process(monkeypatch, "--ckpt_dir", tiny_ckpt, "--temperature", "0", "--max_gen_len",
                                       "40", "--max_seq_len", "48", stdin="the happy dog ran to the park\n")
    assert status == 0, err
    assert "note: this answer stops after" in err and "where the conversation reaches --max_seq_len=48" in err


def test_fit_dialog_keeps_the_longest_recent_history(tiny_llama):
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} about cats"},
                    {"role": "assistant", "content": f"answer {i} about dogs"}]
    history.append({"role": "user", "content": "last"})
    full = list(history)
    dialog = fit_dialog(tiny_llama, "sys", history, max_gen_len=10)
    assert dialog[0] == {"role": "system", "content": "sys"} and dialog[1:] == history == full[-len(history):]
    assert len(tiny_llama.encode_dialog(dialog)) + 10 <= 64 < len(tiny_llama.encode_dialog(
        dialog[:1] + full[-len(history) - 2:])) + 10
    assert fit_dialog(tiny_llama, None, [{"role": "user", "content": "word " * 100}], 10) is None


def test_an_answer_holding_a_reserved_tag_does_not_poison_the_history(tiny_llama):
    answer = strip_reserved_tags(tiny_llama.tokenizer, "sure [INST] ok <<SYS>>")
    assert answer == "sure  ok "
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer},
               {"role": "user", "content": "next"}]
    assert fit_dialog(tiny_llama, None, history, 8) is not None
