"""The README and docs/ stay true to the code: every command they show takes the flags it is shown with, every link
lands on a page and a heading, the README stays a short guide, and CI installs and tests as the README says."""
import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT, script
from llama import cli
from llama.commands import chat, generate, serve
from llama import download

PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
COMMANDS = {"example.py": generate.main, "llama-generate": generate.main, "llama.commands.generate": generate.main,
            "chat.py": chat.main, "llama-chat": chat.main, "llama.commands.chat": chat.main,
            "serve.py": serve.main, "llama-serve": serve.main, "llama.serve": serve.main,
            "llama.download": download.main, "llama-download": download.main}


def shell_lines(page: Path):
    """The command lines of a page's bash blocks, continuations joined, comments dropped."""
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                yield line


def command_of(words):
    """(the command's main, its arguments) of a command line, or None for other programs (pip, curl, ...)."""
    while words and (words[0] in ("python", "python3", "-m", "torchrun") or words[0].startswith("--nproc")
                     or words[0].startswith("--n") or words[0].startswith("--master") or words[0].startswith("$")
                     or re.fullmatch(r"\d+|\$\w+", words[0])):
        words = words[1:]
    if not words:
        return None
    name, args = words[0], words[1:]
    if name in COMMANDS:
        return COMMANDS[name], args
    m = re.fullmatch(r"scripts/(\w+)\.py", name)
    return (script(m.group(1)).main, args) if m else None


def shown_argv(args):
    """A shown command line as a user would type it: `[--compile]` is an option, `64|256` a choice of values."""
    out = []
    for a in args:
        a = a.strip("[]")
        if not a or a == "...":
            continue
        a = a.split("|")[0]
        if re.fullmatch(r"\{(\w+),.*\}", a):  # {meta,hf}: one of these
            a = a[1:].split(",")[0]
        out.append("1" if re.fullmatch(r"[NMGS]", a) else a)  # a number to fill in
    return out


def every_command():
    for page in PAGES:
        for line in shell_lines(page):
            words = shlex.split(line.replace("&&", " && "))
            for part in " ".join(shlex.quote(w) for w in words).split(" && "):
                found = command_of(shlex.split(part))
                if found:
                    yield page.name, part, found


@pytest.mark.parametrize("page, line, found", list(every_command()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_shown_takes_its_flags(page, line, found):
    main, args = found
    argv = shown_argv(args)
    flags = cli.flags_of(main)
    try:
        cli.parse_argv(flags, argv)
    except cli.UsageError as e:
        if "missing" not in str(e):  # a page may show a command with some of its arguments
            pytest.fail(f"{page}: `{line}`: {e}")


def test_the_pages_show_every_command():
    shown = {line.split()[0] for _, line, _ in every_command()}
    names = " ".join(line for _, line, _ in every_command())
    for command in ("example.py", "chat.py", "serve.py", "llama.download", "scripts/benchmark.py",
                    "scripts/load_test.py", "scripts/convert_llama2c.py", "scripts/merge_lora.py"):
        assert command in names, command
    assert shown


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_every_link_lands_on_a_page_and_a_heading():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path) if path else page
            assert file.exists(), f"{page.name}: a link to {target}: no such file"
            if anchor and file.suffix == ".md":
                anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)}
                assert anchor in anchors, f"{page.name}: a link to {target}: no such heading"


def test_the_readme_is_a_short_guide_and_ci_follows_it():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 300
    for stale in ("predate", "a rerun", "earlier runs", "load_state_dict`"):
        assert stale not in readme, stale
    ci = (ROOT / ".ci" / "run").read_text()
    install = next(line.strip() for line in ci.splitlines() if line.strip().startswith("pip install"))
    assert install.replace(" -q", "") in readme  # the README's plain install line
    test = next(line.strip() for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    assert test in readme  # and its test command
    assert "https://download.pytorch.org/whl/cpu" in readme
