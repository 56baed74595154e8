"""llama-chat (chat.py) driven through piped stdin: in this process, and as a user runs it on one process and two;
Ctrl-C on both."""
import io
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, free_port, run_main, run_python, subprocess_env, torchrun
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


def test_reset_and_exit(tiny_ckpt, chat_llama, monkeypatch):
    status, out, err = chat_in_process(monkeypatch, "--ckpt_dir", tiny_ckpt, *ARGS,
                                       stdin="Hello\n/reset\nHello\n/exit\nnever read\n")
    assert status == 0, err
    first = expected_transcript(chat_llama, ["Hello"]).removesuffix("> \n")
    assert out == first + "> /reset\n(history cleared)\n" + first + "> /exit\n"


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


class Ranks:
    """chat.py on `n` processes started as torchrun starts them (or torchrun itself, with `torchrun`), all in one
    process group of their own, as a terminal's foreground job: a Ctrl-C there reaches every one of them."""

    def __init__(self, ckpt, n, *args, torchrun=False):
        env = dict(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(n),
                   LOCAL_WORLD_SIZE=str(n))
        cmd = [sys.executable, "chat.py", "--ckpt_dir", str(ckpt), *args]
        if torchrun:
            cmd[1:1] = ["-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
                        f"--master_port={env['MASTER_PORT']}"]
        self.procs = []
        for rank in range(1 if torchrun else n):
            extra = {} if torchrun else dict(RANK=str(rank), LOCAL_RANK=str(rank))
            group = dict(process_group=0 if rank == 0 else self.procs[0].pid)  # rank 0 leads the group
            self.procs.append(subprocess.Popen(
                cmd, cwd=ROOT, env=subprocess_env(**({} if torchrun else env), **extra),
                stdin=subprocess.PIPE if rank == 0 else subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, **group))
        self.shown = b""

    def read_until(self, done, timeout=120):
        """Rank 0's output until `done(output)`, or until a string `done` appears in it."""
        done = (lambda out, text=done.encode(): text in out) if isinstance(done, str) else done
        deadline = time.monotonic() + timeout
        out = self.procs[0].stdout.fileno()
        while not done(self.shown):
            assert time.monotonic() < deadline and all(p.poll() is None for p in self.procs), self.shown
            self.shown += os.read(out, 4096)

    def ctrl_c(self, times=1):
        for _ in range(times):
            os.killpg(self.procs[0].pid, signal.SIGINT)
            time.sleep(0.2)

    def finish(self, timeout=60):
        """(exit status, stderr) of each process; rank 0's whole output is in `shown`."""
        results = []
        for p in self.procs:
            try:
                out, err = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.procs[0].pid, signal.SIGKILL)
                out, err = p.communicate()
            if p is self.procs[0]:
                self.shown += out
            results.append((p.returncode, err.decode(errors="replace")))
        return results


@pytest.mark.slow
def test_ctrl_c_at_the_prompt_ends_quietly_with_status_130(tiny_ckpt):
    """Issue 18, item 16: Ctrl-C at the prompt printed a 22-line traceback."""
    ranks = Ranks(tiny_ckpt, 1, *ARGS)
    ranks.read_until("> ")
    ranks.ctrl_c()
    [(status, err)] = ranks.finish()
    assert status == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err


@pytest.mark.slow
@pytest.mark.parametrize("when", ["at the prompt", "while answering"])
def test_ctrl_c_ends_every_rank_quietly_with_status_130(tiny_ckpt2, when):
    """Issue 18, item 16: under torchrun --nproc_per_node 2 Ctrl-C printed about 95 lines of tracebacks. The
    terminal's Ctrl-C reaches both ranks; torchrun then sends each a second SIGINT."""
    ranks = Ranks(tiny_ckpt2, 2, "--temperature", "0", "--max_seq_len", "2048", "--max_gen_len", "2000")
    ranks.read_until("> ")
    if when == "while answering":
        ranks.procs[0].stdin.write(b"Tell me a very long story\n")
        ranks.procs[0].stdin.flush()
        ranks.read_until(lambda out: len(out.partition(b"long story\n")[2]) > 20)  # the answer has begun
    ranks.ctrl_c(times=2)
    results = ranks.finish()
    if when == "while answering":
        assert b"\n> " not in ranks.shown.partition(b"long story\n")[2]  # cut short: no prompt after the answer
    for rank, (status, err) in enumerate(results):
        assert status == 130, (rank, err[-3000:])
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, (rank, err[-3000:])


@pytest.mark.slow
def test_ctrl_c_under_torchrun_leaves_only_torchrun_s_own_report(tiny_ckpt2):
    ranks = Ranks(tiny_ckpt2, 2, *ARGS, torchrun=True)
    ranks.read_until("> ")
    ranks.ctrl_c()
    [(status, err)] = ranks.finish()
    assert status != 0 and "Received 2 death signal, shutting down workers" in err  # torchrun's words
    assert "[rank" not in err and "chat.py" not in err and "KeyboardInterrupt" not in err, err[-3000:]
