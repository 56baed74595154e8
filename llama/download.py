"""`llama-download` (`python -m llama.download`, scripts/download.py): checkpoints from the Hugging Face Hub.

    python -m llama.download stories15M                                 # llama2.c's TinyStories model, converted
    python -m llama.download TinyLlama/TinyLlama-1.1B-Chat-v1.0         # a Hugging Face folder, as it is
    python -m llama.download meta-llama/Meta-Llama-3-8B --include "original/*"   # gated: hf auth login first
    python -m llama.download test-assets --dir ../shared/assets         # the real files some tests read

Files come through huggingface_hub: the token is the usual one (HF_TOKEN, or the one `hf auth login` saved), the
endpoint HF_ENDPOINT's (default https://huggingface.co), a connection that drops or stalls resumes where it
stopped, and files already complete are kept, so running the same command again finishes an interrupted
download. Every file is then checked against the Hub's checksum (sha256 for LFS files, the git blob hash for
the others) and, for the shortcuts, against the sha256 pinned here; a damaged file is fetched once more, then
refused. The shortcuts' llama2.c files are converted to Meta's layout on the spot (llama.llama2c), so that
`--ckpt_dir DIR` runs them.
"""
import hashlib
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from llama import cli

log = logging.getLogger("llama.download")

TINYLLAMAS = "karpathy/tinyllamas"
TINYLLAMAS_REVISION = "0bd21da7698eaf29a0d7de3992de8a46ef624add"  # main since 2023-08-15
LLAMA2_TOKENIZER = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"  # also TinyLlama's


@dataclass(frozen=True)
class Remote:
    """One file of a shortcut: where it lives on the Hub, the name it gets, and its pinned sha256 (if known)."""

    repo: str
    path: str
    name: str
    sha256: Optional[str] = None
    revision: Optional[str] = None


@dataclass(frozen=True)
class Shortcut:
    files: Tuple[Remote, ...]
    llama2c: bool = True  # convert files[0] (a llama2.c .bin) with files[1] (its tokenizer) to Meta's layout


def _stories(name: str, path: str, sha256: Optional[str], tokenizer: Remote) -> Shortcut:
    return Shortcut((Remote(TINYLLAMAS, path, f"{name}.bin", sha256, TINYLLAMAS_REVISION), tokenizer))


_LLAMA2_TOKENIZER = Remote("TinyLlama/TinyLlama_v1.1", "tokenizer.model", "tokenizer.model", LLAMA2_TOKENIZER)
_STORIES260K = "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696"
_TOK512 = Remote(TINYLLAMAS, "stories260K/tok512.model", "tok512.model",
                 "822b28dcdee7b4f2de3332e0066a3f33688e08afb26e9e7808a58aa6426bd55b", TINYLLAMAS_REVISION)
SHORTCUTS: Dict[str, Shortcut] = {
    # llama2.c's TinyStories models: 260K parameters (1 MB, its own 512-token tokenizer, context 512), 15M (about
    # 60 MB, context 256), 42M (about 170 MB, context 1024), 110M (about 440 MB, context 1024); Llama 2's tokenizer
    "stories260K": _stories("stories260K", "stories260K/stories260K.bin", _STORIES260K, _TOK512),
    "stories15M": _stories("stories15M", "stories15M.bin", None, _LLAMA2_TOKENIZER),
    "stories42M": _stories("stories42M", "stories42M.bin", None, _LLAMA2_TOKENIZER),
    "stories110M": _stories("stories110M", "stories110M.bin", None, _LLAMA2_TOKENIZER),
    # the real files the tests read (LLAMA_TEST_ASSETS, default ../shared/assets), as they are; Llama 3's tokenizer
    # only with access to the gated meta-llama/Meta-Llama-3-8B
    "test-assets": Shortcut((
        Remote(TINYLLAMAS, "stories260K/stories260K.bin", "stories260K.bin", _STORIES260K, TINYLLAMAS_REVISION),
        _TOK512,
        Remote(TINYLLAMAS, "stories260K/tok512.bin", "tok512.bin",
               "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312", TINYLLAMAS_REVISION),
        Remote(_LLAMA2_TOKENIZER.repo, "tokenizer.model", "llama_tokenizer.model", LLAMA2_TOKENIZER),
        Remote("meta-llama/Meta-Llama-3-8B", "original/tokenizer.model", "llama3_tokenizer.model",
               "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"),
    ), llama2c=False),
}


class DownloadError(OSError):
    """A download that cannot complete: the message says why and what to do."""


def main(repo: str, include: Optional[List[str]] = None, dir: Optional[str] = None,
         revision: Optional[str] = None) -> None:
    """Download a checkpoint from the Hugging Face Hub into a folder that --ckpt_dir takes. REPO is a Hub repository
    (owner/name) or a shortcut: stories260K, stories15M, stories42M, stories110M (llama2.c's TinyStories models,
    converted to Meta's layout on the spot) or test-assets. Interrupted? Run the same command again: complete files
    are kept and checked, the rest is fetched. Gated repositories (meta-llama/...) need their license accepted on the
    Hub and a token: `hf auth login`, or HF_TOKEN.

    Args:
        repo: a Hub repository such as TinyLlama/TinyLlama-1.1B-Chat-v1.0 or meta-llama/Meta-Llama-3-8B, or a
            shortcut.
        include: only the files matching these patterns (e.g. "original/*" for a meta-llama repository's Meta-
            layout files, "*.safetensors" "*.json" "tokenizer.model"); default: every file.
        dir: the folder to write; default: checkpoints/NAME in the current folder.
        revision: a branch, tag or commit of the repository; default: main (shortcuts pin their own).
    """
    shortcut = SHORTCUTS.get(repo)
    target = Path(dir).expanduser() if dir else Path("checkpoints") / (repo if shortcut else repo.split("/")[-1])
    if shortcut is not None:
        if include or revision:
            raise ValueError(f"{repo} is a shortcut with its own files: --include and --revision apply to "
                             "repositories (owner/name)")
        fetch_shortcut(repo, shortcut, target)
    elif "/" in repo.strip("/"):
        paths = fetch_repo(repo, target, include, revision)
        cli.say(f"downloaded {len(paths)} file(s) of {repo} to {target}")
    else:
        raise ValueError(f"repo={repo!r} is neither a Hub repository (owner/name) nor a shortcut "
                         f"({', '.join(SHORTCUTS)})")
    if shortcut is None or shortcut.llama2c:
        cli.say(f"run it: llama-generate --ckpt_dir {target}")


def fetch_repo(repo: str, target: Path, include: Optional[Sequence[str]] = None,
               revision: Optional[str] = None) -> List[Path]:
    """Download the files of `repo` matching `include` into `target`, checked; their local paths."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    api = HfApi(endpoint=_endpoint())
    with _hub_errors(repo):
        commit = api.repo_info(repo, revision=revision).sha
        files = {f.path: f for f in api.list_repo_tree(repo, recursive=True, revision=commit)
                 if isinstance(f, RepoFile)}
    chosen = sorted(filter_repo_objects(list(files), allow_patterns=list(include) if include else None))
    if not chosen:
        raise DownloadError(f"no file of {repo} matches --include {' '.join(include or [])}: it holds "
                            f"{', '.join(sorted(files)[:12])}{', ...' if len(files) > 12 else ''}")
    target.mkdir(parents=True, exist_ok=True)
    return [_fetch(repo, files[path], commit, target) for path in chosen]


def fetch_shortcut(name: str, shortcut: Shortcut, target: Path) -> None:
    """Download a shortcut's files (checked against their pinned sha256 too) and convert or place them."""
    parts = target.parent / f".{target.name}.download"  # kept until the end: a rerun resumes from it
    got: Dict[str, Path] = {}
    for remote in shortcut.files:
        try:
            got[remote.name] = fetch_one(remote, parts)
        except DownloadError as e:
            if shortcut.llama2c or not getattr(e, "gated", False):
                raise
            cli.note(f"skipped {remote.name}: {e}")
    if shortcut.llama2c:
        from llama.llama2c import convert_llama2c

        model, tokenizer = (got[r.name] for r in shortcut.files)
        if target.exists():
            shutil.rmtree(target)  # a previous conversion: replaced by this one
        convert_llama2c(model, tokenizer, target)
        cli.say(f"converted {name} to Meta's layout in {target}")
    else:
        target.mkdir(parents=True, exist_ok=True)
        for file_name, path in got.items():
            os.replace(path, target / file_name)
        cli.say(f"wrote {', '.join(got)} to {target}")
    shutil.rmtree(parts, ignore_errors=True)


def fetch_one(remote: Remote, parts: Path) -> Path:
    """One file of a shortcut, downloaded into `parts` and checked; its path."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=_endpoint())
    folder_in_repo = remote.path.rpartition("/")[0] or None
    with _hub_errors(remote.repo):
        info = next((f for f in api.list_repo_tree(remote.repo, folder_in_repo, revision=remote.revision)
                     if isinstance(f, RepoFile) and f.path == remote.path), None)
    if info is None:
        raise DownloadError(f"{remote.repo} has no file {remote.path}")
    folder = parts / remote.repo.replace("/", "--")
    folder.mkdir(parents=True, exist_ok=True)
    path = _fetch(remote.repo, info, remote.revision, folder)
    if remote.sha256 is not None and _sha256(path) != remote.sha256:
        path.unlink()
        raise DownloadError(f"{remote.repo}/{remote.path} is not the file this shortcut expects (sha256 "
                            f"{remote.sha256[:16]}...): the repository changed; download it with --include instead")
    return path


def _fetch(repo: str, entry, revision: Optional[str], folder: Path) -> Path:
    """`entry` (a RepoFile) of `repo` downloaded into `folder` and checked against the Hub's checksum; a damaged
    file is fetched once more, then refused."""
    from huggingface_hub import hf_hub_download

    for attempt in range(2):
        with _hub_errors(repo):
            path = Path(hf_hub_download(repo, entry.path, revision=revision, local_dir=folder,
                                        endpoint=_endpoint(), force_download=attempt > 0))
        algorithm, expected = _expected_hash(entry)
        actual = _sha256(path) if algorithm == "sha256" else _git_blob_sha1(path)
        if actual == expected:
            return path
        path.unlink()
        if attempt == 0:
            log.warning("%s: %s %s does not match the Hub's %s: downloading it again", entry.path, algorithm,
                        actual[:16], expected[:16])
    raise DownloadError(f"{repo}/{entry.path} arrived damaged twice ({algorithm} {actual[:16]}... instead of the "
                        f"Hub's {expected[:16]}...): it was deleted; run the command again")


def _expected_hash(entry) -> Tuple[str, str]:
    lfs = entry.lfs
    sha256 = getattr(lfs, "sha256", None) or (lfs.get("sha256") if isinstance(lfs, dict) else None)
    return ("sha256", sha256.lower()) if sha256 else ("git-sha1", entry.blob_id.lower())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    """git's object id of a file: sha1 of "blob SIZE\\0" and its bytes."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _endpoint() -> Optional[str]:
    """HF_ENDPOINT as it is now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT") or None


class _hub_errors:
    """huggingface_hub's errors as DownloadErrors that say what to do."""

    def __init__(self, repo: str):
        self.repo = repo

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or isinstance(e, DownloadError) or not isinstance(e, Exception):
            return False
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        hub = _endpoint() or "https://huggingface.co"
        login = "log in with `hf auth login` (or set HF_TOKEN)"
        if isinstance(e, GatedRepoError):
            error = DownloadError(f"{self.repo} is gated: accept its license at {hub}/{self.repo} while signed in, "
                                  f"then {login}")
            error.gated = True
        elif isinstance(e, RepositoryNotFoundError):
            error = DownloadError(f"{self.repo} is not a repository on {hub}, or it is private: check the name, or "
                                  f"{login}")
        elif isinstance(e, RevisionNotFoundError):
            error = DownloadError(f"{self.repo} has no such revision: {_first_line(e)}")
        else:
            error = DownloadError(f"downloading {self.repo} from {hub} failed ({type(e).__name__}: {_first_line(e)}); "
                                  "run the same command again to resume")
        raise error from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def run(argv: Optional[Sequence[str]] = None, prog: str = "llama-download") -> int:
    return cli.run(main, argv, prog)


if __name__ == "__main__":
    sys.exit(run(prog="python -m llama.download"))
