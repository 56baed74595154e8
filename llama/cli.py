"""What every command line of the package shares: `llama-generate`, `llama-chat`, `llama-serve`,
`llama-download` (and example.py, chat.py, serve.py, scripts/*.py, which call them).

A command is a plain function; its signature gives the flags, its docstring's `Args:` section their help.
`run(main, argv)` checks the whole command line against the signature before anything loads or listens: an
unknown flag, a missing argument or a value of the wrong type ends the program with exit status 2 and one
line naming the flag (and the closest known one, for a misspelling). fire then calls the function, with a
parse function per flag so that values arrive as typed (`--api_key 'k#1'` stays a string, `--stop 3` is
the string "3", `--prompts a b c` three prompts). An error the function raises for bad input (a ValueError,
a missing file, memory too small) ends every rank with exit status 1 and one line from rank 0 that names
flags, not Python arguments (`--max_seq_len=128`, not `max_seq_len=128`). Ctrl-C ends every rank quietly
with exit status 130.
"""
from __future__ import annotations

import difflib
import inspect
import json
import logging
import os
import re
import sys
import tempfile
import textwrap
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

USAGE_ERROR = 2  # argparse's status for a command line it cannot use
INPUT_ERROR = 1
INTERRUPTED = 130  # the exit status of a program ended by Ctrl-C (128 + SIGINT), as shells report it

DEMO_WARNING = (
    "No --ckpt_dir given: running a tiny random-weight demo model built on the spot. Its output is "
    "gibberish BY DESIGN. For real text pass --ckpt_dir with a checkpoint folder, e.g. one made by "
    "`python -m llama.download stories15M`."
)


class UsageError(Exception):
    """A command line that names an unknown flag, misses an argument, or gives a value of the wrong type."""


# Flags.

@dataclass
class Flag:
    name: str
    kind: str  # "str", "int", "float", "bool", "list" (one or more words), "stop" (a string or a JSON list),
    # "any" (no annotation: a Python literal, else the string, as fire reads it: `--batch 1,8` is (1, 8))
    default: Any
    required: bool
    help: str

    def parse(self, text: str) -> Any:
        """`text` as this flag's value, or a UsageError saying what it must be."""
        try:
            if self.kind == "int":
                return int(text)
            if self.kind == "float":  # an integer stays one, so errors quote it as written
                return int(text) if re.fullmatch(r"[+-]?\d+", text.strip()) else float(text)
        except ValueError:
            raise UsageError(f"--{self.name} expects {'an integer' if self.kind == 'int' else 'a number'}, "
                             f"got {text!r}") from None
        if self.kind == "bool":
            if text.lower() not in ("true", "false"):
                raise UsageError(f"--{self.name} is a switch: give it alone (or --no{self.name}), or as "
                                 f"--{self.name}=true / false, not {text!r}")
            return text.lower() == "true"
        if self.kind == "stop":
            return parse_stop(text)
        if self.kind == "any":
            from fire.parser import DefaultParseValue

            return DefaultParseValue(text)
        return text

    @property
    def metavar(self) -> str:
        return {"int": "N", "float": "X", "bool": "", "list": f"{self.name.upper()} ...", "stop": "TEXT"}.get(
            self.kind, self.name.upper())


def parse_stop(text: str):
    """A stop string as given, or the list of strings a JSON list holds (`'["\\n", "THE END"]'`)."""
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            return text
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value
    return text


_KINDS = {str: "str", int: "int", float: "float", bool: "bool"}


def _kind(hint: Any, name: str) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:  # Optional[X]
        hint = args[0]
    if typing.get_origin(hint) in (list, List):
        return "list"
    if typing.get_origin(hint) is typing.Union and str in args:  # str or a list of them: a stop string
        return "stop"
    if hint in _KINDS:
        return _KINDS[hint]
    raise TypeError(f"flag {name}: no command-line parsing for type {hint!r}")


def flags_of(main: Callable) -> Dict[str, Flag]:
    """The flags of `main`: every parameter, its kind from its annotation and its help from the docstring."""
    hints = typing.get_type_hints(main)
    helps = _arg_help(inspect.getdoc(main) or "")
    flags = {}
    for name, p in inspect.signature(main).parameters.items():
        required = p.default is inspect.Parameter.empty
        kind = _kind(hints[name], name) if name in hints else "any"
        flags[name] = Flag(name, kind, None if required else p.default, required, helps.get(name, ""))
    return flags


def _arg_help(doc: str) -> Dict[str, str]:
    """{name: description} from a Google-style `Args:` section."""
    out: Dict[str, str] = {}
    section, name = False, None
    for line in doc.splitlines():
        if line.strip() == "Args:":
            section = True
            continue
        if not section:
            continue
        if line and not line.startswith(" "):  # the section ended
            break
        m = re.match(r"^ {4}(\w+):\s*(.*)$", line)
        if m:
            name = m.group(1)
            out[name] = m.group(2)
        elif name and line.strip():
            out[name] += " " + line.strip()
    return out


def _description(doc: str) -> str:
    return doc.split("\nArgs:")[0].strip()


# The command line.

def parse_argv(flags: Dict[str, Flag], argv: Sequence[str]) -> Dict[str, Any]:
    """{name: value} of the flags in `argv` (positional arguments fill the required parameters not given as
    flags, in order), or a UsageError. A list flag takes every word up to the next --flag, and may be given
    again (its values add up); `--name=value` takes the value verbatim; a switch stands alone (`--stream`,
    `--nostream`)."""
    given: Dict[str, Any] = {}
    positional: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not (arg.startswith("-") and len(arg) > 1 and not _is_number(arg)):
            positional.append(arg)
            i += 1
            continue
        name, eq, value = arg.lstrip("-").partition("=")
        key = name.replace("-", "_")
        negated = key.startswith("no") and key[2:] in flags and flags[key[2:]].kind == "bool" and key not in flags
        if not arg.startswith("--") or (key not in flags and not negated):
            raise UsageError(f"unknown flag {arg.split('=')[0]}{_suggestion(key, flags)}")
        flag = flags[key[2:] if negated else key]
        if flag.name in given and flag.kind != "list":  # a list flag may repeat: its values add up
            raise UsageError(f"--{flag.name} is given twice")
        before = given.pop(flag.name, []) if flag.kind == "list" else []
        if flag.kind == "bool":
            given[flag.name] = (not negated) if not eq else flag.parse(value)
            if negated and eq:
                raise UsageError(f"--no{flag.name} takes no value")
            i += 1
        elif eq:
            given[flag.name] = before + [value] if flag.kind == "list" else flag.parse(value)
            i += 1
        elif flag.kind == "list":
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            if j == i + 1:
                raise UsageError(f"--{flag.name} needs at least one value")
            given[flag.name], i = before + list(argv[i + 1 : j]), j
        else:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UsageError(f"--{flag.name} needs a value ({flag.metavar})")
            given[flag.name] = flag.parse(argv[i + 1])
            i += 2
    free = [f for name, f in flags.items() if name not in given and f.required]
    if len(positional) > len(free):
        takes = " ".join(f.name.upper() for f in flags.values() if f.required)
        hint = f"this command takes {takes}, then --flags" if takes else "give every value after its --flag"
        raise UsageError(f"unexpected argument {positional[len(free)]!r}: {hint}")
    for flag, text in zip(free, positional):
        given[flag.name] = [text] if flag.kind == "list" else flag.parse(text)
    missing = [f for f in flags.values() if f.required and f.name not in given]
    if missing:
        raise UsageError(f"missing {missing[0].name.upper()} (give it as an argument or as --{missing[0].name})")
    return given


def _is_number(arg: str) -> bool:
    try:
        float(arg)
        return True
    except ValueError:
        return False


def _suggestion(key: str, flags: Dict[str, Flag]) -> str:
    names = list(flags) + ["no" + f.name for f in flags.values() if f.kind == "bool"] + ["help"]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f": did you mean --{close[0]}?" if close else " (see --help)"


def help_text(main: Callable, prog: str) -> str:
    flags = flags_of(main)
    doc = inspect.getdoc(main) or inspect.getdoc(inspect.getmodule(main)) or ""
    required = " ".join(f.name.upper() for f in flags.values() if f.required)
    lines = [f"usage: {prog} {required + ' ' if required else ''}[--flag value ...]", "", _description(doc), "",
             "flags:"]
    for f in flags.values():
        head = f"  --{f.name}" + (f" {f.metavar}" if f.metavar else "")
        default = "" if f.required or f.default is None else f" (default: {f.default})"
        if f.kind == "bool":
            default = f" (default: {'on' if f.default else 'off'}; --no{f.name} turns it off)" if f.default else ""
        body = (f.help + default).strip() or "-"
        wrapped = textwrap.wrap(body, 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
        lines += [head] + wrapped
    return "\n".join(lines) + "\n"


# Running a command.

def run(main: Callable, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None,
        more_errors: Tuple[type, ...] = ()) -> int:
    """Run `main` on the command line `argv` (default: sys.argv[1:]): the exit status.

    Usage errors (exit 2) come before anything runs; --help prints the flags; bad input raised by `main`
    (exit 1) is one line from rank 0 naming the flags (also for `more_errors`); every rank of a torchrun job
    ends alike. Ctrl-C ends every rank quietly with exit status 130, including a rank whose collective call
    broke because another rank left on its Ctrl-C.
    """
    import signal

    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or Path(sys.argv[0]).name
    rank = int(os.environ.get("RANK", "0"))
    flags = flags_of(main)
    if "--help" in argv or "-h" in argv:
        if rank == 0:
            sys.stdout.write(help_text(main, prog))
        return 0
    try:
        given = parse_argv(flags, argv)
    except UsageError as e:
        if rank == 0:
            print(f"{prog}: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, format="%(message)s")
    import torch.distributed as dist

    had_group = dist.is_initialized()  # in a Python program that already runs one, it stays its own
    # fire calls `main`; each value is already typed, so its parse function hands it over as it is.
    fire.decorators.SetParseFns(**{name: (lambda _, v=value: v) for name, value in given.items()})(main)
    ctrl_c = CtrlC()
    previous = signal.signal(signal.SIGINT, ctrl_c)
    try:
        fire.Fire(main, command=[f"--{name}=_" for name in given], name=prog)
    except KeyboardInterrupt:
        return _interrupted(rank)
    except input_errors() + tuple(more_errors) as e:
        if ctrl_c.pressed:
            return _interrupted(rank)
        if rank == 0:
            print(f"error: {flag_names(str(e), flags) or type(e).__name__}", file=sys.stderr)
        return INPUT_ERROR
    except Exception:
        if ctrl_c.pressed:
            return _interrupted(rank)
        raise
    finally:
        interrupted, ctrl_c.pressed = ctrl_c.pressed, True  # from here on a Ctrl-C is ignored
        try:
            if not had_group:  # the group this run set up (Llama.build), with fairscale's on top
                from llama.distributed import end_process_group

                end_process_group()
        finally:
            # Interrupted, the process is ending: a second Ctrl-C (torchrun forwards one) must not kill it by
            # signal on the way out. Otherwise the caller's handler is back.
            signal.signal(signal.SIGINT, signal.SIG_IGN if interrupted else previous)
    return 0


class CtrlC:
    """A SIGINT handler that raises KeyboardInterrupt once and ignores the signals after it: under torchrun a
    terminal's Ctrl-C reaches every rank, and torchrun then sends each the same signal again."""

    def __init__(self):
        self.pressed = False

    def __call__(self, signum, frame) -> None:
        if not self.pressed:
            self.pressed = True
            raise KeyboardInterrupt


def _interrupted(rank: int) -> int:
    if rank == 0 and sys.stderr.isatty():
        print(file=sys.stderr)  # the shell's prompt on a line of its own, after the terminal's ^C
    return INTERRUPTED


def input_errors() -> Tuple[type, ...]:
    """What bad input raises: a ValueError or TypeError naming the value, a file that is missing or unreadable,
    memory too small, or another rank's error of that kind."""
    import torch

    from llama.distributed import RankError

    return ValueError, TypeError, OSError, MemoryError, torch.cuda.OutOfMemoryError, RankError


def flag_names(message: str, flags: Dict[str, Flag]) -> str:
    """`message` with the Python names of this command's flags written as flags: `max_seq_len=128` and
    `a larger max_seq_len` become `--max_seq_len=128`, `a larger --max_seq_len`."""
    for name in sorted(flags, key=len, reverse=True):
        edge = r"(?<![\w./-])"  # not inside a word, a path or a flag already
        pattern = rf"{edge}({re.escape(name)})(?==)" if "_" not in name else rf"{edge}({re.escape(name)})\b"
        message = re.sub(pattern, r"--\1", message)
    return message


# What the commands print and load.

def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(*args, **kwargs) -> None:
    """print, on rank 0 only."""
    if is_rank0():
        print(*args, **kwargs)


def note(message: str) -> None:
    """A line on stderr from rank 0: what the user should know but did not ask for."""
    if is_rank0():
        print(f"note: {message}", file=sys.stderr, flush=True)


@contextmanager
def checkpoint_or_demo(ckpt_dir: Optional[str]) -> Iterator[str]:
    """`ckpt_dir`, or (when None) a tiny random-weight demo checkpoint written to a temporary folder for as
    long as the context lasts, with a warning that its text is gibberish."""
    if ckpt_dir is not None:
        yield str(ckpt_dir)
        return
    from llama.tiny import make_tiny_checkpoint

    logging.getLogger("llama").warning(DEMO_WARNING)
    with tempfile.TemporaryDirectory(prefix="llama-demo-") as scratch:
        yield str(make_tiny_checkpoint(os.path.join(scratch, "tiny")))


def gen_len_note(prompt_lens: Sequence[int], max_gen_len: int, max_seq_len: int, context: Optional[int]) -> None:
    """Say so when --max_gen_len would run past --max_seq_len for some prompt: those answers are cut there."""
    room = min(max_seq_len - n for n in prompt_lens)
    if max_gen_len > room:
        longest = f" (the checkpoint's context is {context} tokens)" if context and context > max_seq_len else ""
        note(f"--max_gen_len={max_gen_len} does not fit in --max_seq_len={max_seq_len} after the longest prompt: "
             f"answers stop after {max(room, 0)} new tokens; pass a larger --max_seq_len{longest}")
