"""Find, validate, load, reshard and write Meta-layout checkpoints.

A Meta checkpoint folder holds `params.json` and one `consolidated.NN.pth` per model-parallel
shard. Each tensor is cut along the dimension its fairscale layer splits: column-parallel
weights along dim 0, row-parallel weights along dim 1, norms replicated. The embedding is cut
along dim 1 in Llama 1/2 checkpoints and along dim 0 (vocabulary rows) in Llama 3 ones.

A checkpoint of S shards loads on M model-parallel ranks whenever S % M == 0 or M % S == 0:
each rank assembles its own slice of every tensor from the shards that hold part of it.
"""
from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import pickle
import shutil
import sys
import time
import uuid
import zipfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from llama.errors import CheckpointError
from llama.model import ModelArgs
from llama.quantize import INT4_LEAVES, Layout, quantized_shapes, read_layout

log = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
Region = List[Tuple[int, int]]  # per dimension, the [start, stop) a piece covers in the whole tensor

_COLUMN = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
_ROW = ("wo.weight", "w2.weight", "tok_embeddings.weight")
# Quantized checkpoints (llama.quantize) add, for each linear weight, int8 scales (one per output
# row: split with the rows of a column-parallel weight, whole on every shard for a row-parallel
# one) or int4 group scales and zeros (out, in / group size), split like the weight itself.
_GROUPS = tuple(f".{leaf}" for leaf in INT4_LEAVES)
_COLUMN_SCALES = tuple(n.replace(".weight", s) for n in _COLUMN for s in (".scales", *_GROUPS))
_ROW_GROUPS = tuple(n.replace(".weight", s) for n in _ROW[:2] for s in _GROUPS)
_QUANT_AUX = (".scales", *_GROUPS)  # float tensors of a quantized checkpoint that keep their own dtype
_DERIVED = ("rope.freqs",)  # a RoPE table some Llama 1 checkpoints carry; the model computes its own


def shard_dim(name: str) -> Optional[int]:
    """The dimension along which the model (and Llama 1/2 checkpoints) split tensor `name`; None if replicated."""
    if name.endswith(_COLUMN + _COLUMN_SCALES):
        return 0
    if name.endswith(_ROW + _ROW_GROUPS):
        return 1
    return None


def linear_names(args: ModelArgs) -> List[str]:
    """The checkpoint names of the linears that quantizing replaces ("layers.0.attention.wq", ...)."""
    return [n[: -len(".weight")] for n, shape in full_shapes(args).items()
            if len(shape) == 2 and n != "tok_embeddings.weight"]


def linear_inputs(args: ModelArgs, world_size: int) -> Dict[str, Tuple[int, int]]:
    """For llama.quantize.plan: each linear's in-features and the number of parts they are split into."""
    shapes = full_shapes(args)
    return {n: (shapes[n + ".weight"][1], world_size if shard_dim(n + ".weight") == 1 else 1)
            for n in linear_names(args)}


def full_shapes(args: ModelArgs, quantized: Union[bool, Layout, None] = False) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the whole model, in checkpoint order, with its unsplit (out, in) shape. With
    `quantized` (True: int8 everywhere; or a llama.quantize layout), each linear weight has its
    quantized shape, and its scales (int8 `NAME.scales`; int4 `NAME.group_scales` and
    `NAME.group_zeros`) follow all the other tensors."""
    kv_dim = args.n_kv_heads * args.head_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.dim, args.dim), p + "attention.wk.weight": (kv_dim, args.dim),
            p + "attention.wv.weight": (kv_dim, args.dim), p + "attention.wo.weight": (args.dim, args.dim),
            p + "feed_forward.w1.weight": (args.hidden_dim, args.dim),
            p + "feed_forward.w2.weight": (args.dim, args.hidden_dim),
            p + "feed_forward.w3.weight": (args.hidden_dim, args.dim),
            p + "attention_norm.weight": (args.dim,), p + "ffn_norm.weight": (args.dim,),
        })
    shapes.update({"norm.weight": (args.dim,), "output.weight": (args.vocab_size, args.dim)})
    if quantized:
        layout = dict.fromkeys(linear_names(args)) if quantized is True else quantized
        extra = {}
        for name in layout:
            for key, shape in quantized_shapes(name, *shapes[name + ".weight"], layout[name]).items():
                if key in shapes:
                    shapes[key] = shape
                else:
                    extra[key] = shape
        shapes.update(extra)
    return shapes


def ffn_params(dim: int, hidden_dim: int) -> dict:
    """multiple_of / ffn_dim_multiplier that make ModelArgs.hidden_dim come out as `hidden_dim`."""
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if ModelArgs(dim=dim, n_heads=1, multiple_of=multiple_of).hidden_dim == hidden_dim:
            return {"multiple_of": multiple_of}
    base = int(2 * 4 * dim / 3)
    # Rounding up to a multiple of hidden_dim itself lands exactly on hidden_dim once the
    # (multiplied) base is at most hidden_dim.
    if hidden_dim >= base:
        return {"multiple_of": hidden_dim}
    return {"multiple_of": hidden_dim, "ffn_dim_multiplier": hidden_dim / base}


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): restore the file from the original download")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def load_params(ckpt_dir: str | os.PathLike) -> dict:
    path = Path(ckpt_dir) / "params.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a Meta checkpoint folder needs params.json beside its shards")
    return read_json(path)


def model_args(params: dict, source: Path) -> ModelArgs:
    """ModelArgs from a params dict, with any inconsistency reported against `source`."""
    try:
        return ModelArgs.from_params(params)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def find_shards(ckpt_dir: str | os.PathLike) -> List[Path]:
    folder = Path(ckpt_dir)
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"no consolidated.NN.pth shards in {str(folder)!r}: point --ckpt_dir at a Meta "
                              "checkpoint folder")
    expected = [folder / f"consolidated.{i:02d}.pth" for i in range(len(shards))]
    if shards != expected:
        raise CheckpointError(f"shards in {folder} are not numbered 00..{len(shards) - 1:02d}: "
                              f"found {[p.name for p in shards]}")
    return shards


def _reason(e: Exception) -> str:
    """The informative sentence of a torch.load error (they run to many lines)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    line = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0])
    return line.split(". ")[0]


def load_shard(path: str | os.PathLike) -> StateDict:
    """Load one shard to CPU, memory-mapped (only its metadata is read), refusing anything but plain tensors."""
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and weights_only loading refused it "
                              f"({_reason(e)}): re-save it as a plain state dict of tensors") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} could not be read ({_reason(e)}): the file is truncated or corrupted; "
                              "download or convert it again") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors: re-save it with torch.save(model.state_dict())")
    for name, t in sd.items():
        check_stored(t, name, path)
    return sd


def check_stored(t: torch.Tensor, name: str, path: Path) -> None:
    """Refuse a tensor whose file stores fewer bytes than its elements need (zero strides, or a storage cut
    short), before anything is allocated for the size it claims."""
    need = t.numel() * t.element_size()
    have = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
    if need > have:
        raise CheckpointError(f"{path}: {name} of shape {tuple(t.shape)} claims {need} bytes but the file stores "
                              f"{max(have, 0)} for it (repeated or missing elements): re-save the checkpoint with "
                              "plain tensors, or download it again")


def confined(folder: Path, name, source: Path) -> Path:
    """`folder / name` for a file name read from `source` (a checkpoint's own file), refused unless it stays
    inside `folder`: a relative path without '..'. Symbolic links inside the folder are followed as they are
    (the Hugging Face cache links its snapshots to blobs elsewhere)."""
    path = PurePosixPath(name) if isinstance(name, str) else None
    if path is None or not name or path.is_absolute() or ".." in path.parts or "\\" in name or ":" in name:
        raise CheckpointError(f"{source} names the file {name!r}, which is not inside {folder}: a checkpoint may "
                              "only name files in its own folder; restore the file from the original download")
    return folder / path


def check_names(found: Iterable[str], expected: Iterable[str], path: Path, fix: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensor names do not match the model (missing: {missing[:5]}, "
                              f"unexpected: {unexpected[:5]}): {fix}")


def check_world(args: ModelArgs, world_size: int, source: Path, layout: Optional[Layout] = None) -> None:
    """Refuse a model-parallel size that would cut a tensor unevenly, split a key/value head or (int4
    `layout`) make a group of input features straddle two ranks."""
    if args.n_kv_heads % world_size or args.n_heads % world_size:
        # Replicating k/v heads across ranks would work too, but costs memory and code; refuse instead.
        raise CheckpointError(f"{source}: n_heads={args.n_heads} and n_kv_heads={args.n_kv_heads} cannot be "
                              f"split over {world_size} model-parallel processes (heads are never split inside "
                              f"a head): run with a number of processes that divides {args.n_kv_heads}")
    for name, shape in full_shapes(args, layout).items():
        dim = shard_dim(name)
        if dim == 1 and name.endswith(_GROUPS) and shape[1] % world_size:
            prefix = name.rpartition(".")[0]
            in_features = full_shapes(args)[prefix + ".weight"][1]
            raise CheckpointError(
                f"{source}: {prefix} is int4 in groups of {in_features // shape[1]} of its {in_features} "
                f"in-features, which {world_size} model-parallel processes would split inside a group: run with "
                f"a number of processes that divides {shape[1]}, or quantize again with a smaller --group_size")
        if dim is not None and shape[dim] % world_size:
            raise CheckpointError(f"{source}: {name} of shape {shape} cannot be split evenly over {world_size} "
                                  f"model-parallel processes along dim {dim}: run with fewer processes")


def region(shape: Sequence[int], dim: Optional[int], part: int, n_parts: int) -> Region:
    """Where part `part` of `n_parts` lies when a tensor of `shape` is cut evenly along `dim` (None: whole)."""
    return [(part * size // n_parts, (part + 1) * size // n_parts) if d == dim else (0, size)
            for d, size in enumerate(shape)]


def extent(r: Region) -> List[int]:
    """The shape of the piece covering region `r`."""
    return [hi - lo for lo, hi in r]


def overlap(have: Region, want: Region) -> Optional[Tuple[tuple, tuple]]:
    """Index tuples into a piece covering `have` and one covering `want` for what both hold; None if disjoint."""
    both = [(max(h0, w0), min(h1, w1)) for (h0, h1), (w0, w1) in zip(have, want)]
    if any(lo >= hi for lo, hi in both):
        return None
    src = tuple(slice(lo - h0, hi - h0) for (lo, hi), (h0, _) in zip(both, have))
    dst = tuple(slice(lo - w0, hi - w0) for (lo, hi), (w0, _) in zip(both, want))
    return src, dst


class Progress:
    """Log, every few seconds and at the end, how much of a rank's weights has been read."""

    def __init__(self, what: str, total_numel: int, enabled: bool, every_s: float = 5.0):
        self.what, self.total, self.enabled, self.every_s = what, max(total_numel, 1), enabled, every_s
        self.numel = self.nbytes = 0
        self.start = self.last = time.perf_counter()

    def add(self, t: torch.Tensor) -> None:
        self.numel += t.numel()
        self.nbytes += t.numel() * t.element_size()
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            log.info("%s: %.2f GB (%.0f%%) after %.1f s", self.what, self.nbytes / 1e9,
                     100 * self.numel / self.total, now - self.start)

    def done(self) -> None:
        if self.enabled:
            log.info("%s: %.2f GB in %.1f s", self.what, self.nbytes / 1e9, time.perf_counter() - self.start)


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_MADV_DONTNEED = 4


def release_pages(t: torch.Tensor) -> None:
    """Let the kernel drop the resident pages of a memory-mapped shard tensor we have copied out.

    Every tensor of a shard views one private mapping of the file, and the pages read stay
    resident until all of them are gone; without this, loading would peak at the rank's weights
    plus the shard. The pages are clean file pages (never written), so a later read refetches them.
    Only call it on tensors from `load_shard` or views of them: on anonymous memory it would zero the data.
    """
    if _libc is None or t.numel() == 0:
        return
    start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    span = 1 + sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))  # first to last element of a view
    end = t.data_ptr() + span * t.element_size()
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


_BLOCK_NUMEL = 4 << 20  # elements copied at a time: 8 MB of bf16, 16 MB of float32


def _row_blocks(src: tuple, dst: tuple) -> Iterator[Tuple[tuple, tuple]]:
    """`overlap`'s (src, dst) index tuples, cut along dim 0 into blocks of about _BLOCK_NUMEL elements."""
    if not src:  # a 0-dim tensor: one block
        yield src, dst
        return
    row_numel = torch.Size(sl.stop - sl.start for sl in src[1:]).numel()
    rows = max(1, _BLOCK_NUMEL // row_numel)
    s, d = src[0], dst[0]
    n = s.stop - s.start
    for lo in range(0, n, rows):
        hi = min(lo + rows, n)
        yield (slice(s.start + lo, s.start + hi),) + src[1:], (slice(d.start + lo, d.start + hi),) + dst[1:]


def assemble(want: Region, parts: Iterable[Tuple[Region, object]], dtype: Optional[torch.dtype],
             device: Union[str, torch.device], release: Optional[Callable[[torch.Tensor], None]] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The `want` region of a tensor, copied from whichever `parts` (region, sliceable) overlap it.

    A sliceable is a tensor or a safetensors slice: indexing it with a tuple of slices gives a tensor.
    The result is `out` when given (filled in place, in its own dtype and device), else a new tensor
    of `dtype` (None: the parts' own), converted piece by piece. The copy goes in
    blocks of rows, each handed to `release` once copied: so the source data held besides the
    result (pages of a mapped file, a block read from safetensors) is one block, not the whole
    tensor, which for the largest tensor would otherwise set the peak of a load.
    """
    if out is not None and list(out.shape) != extent(want):
        raise CheckpointError(f"a checkpoint slice of shape {tuple(extent(want))} does not fit the model's "
                              f"{tuple(out.shape)}")
    for have, source in parts:
        both = overlap(have, want)
        if both is None:
            continue
        for src, dst in _row_blocks(*both):
            piece = source[src]
            if out is None:
                out = torch.empty(extent(want), dtype=dtype or piece.dtype, device=device)
            out[dst].copy_(piece)
            if release is not None:
                release(piece)
    return out


class MetaCheckpoint:
    """A validated Meta checkpoint folder. Every rank validates every shard's metadata, so bad
    input fails alike everywhere; loading then reads only the rank's slices."""

    def __init__(self, folder: Path, world_size: int = 1):
        self.path = folder
        self.params = load_params(folder)
        self.files = find_shards(folder)
        n = len(self.files)
        if n % world_size and world_size % n:
            raise CheckpointError(f"{folder} has {n} shard(s), which cannot be spread over {world_size} "
                                  f"model-parallel process(es): run with torchrun --nproc_per_node {n} (or a "
                                  f"divisor or multiple of {n}), or reshard it with scripts/reshard.py "
                                  f"--num_shards {world_size}")
        # Memory-mapped: this reads each shard's metadata, not its weights.
        self.shards = [self._load(path) for path in self.files]
        self.embedding_dim, vocab_size = self._embedding_split()
        params = dict(self.params)
        if isinstance(params.get("vocab_size", -1), int) and params.get("vocab_size", -1) <= 0:
            params["vocab_size"] = vocab_size  # Llama 1's params.json says -1
        self.args = model_args(params, folder / "params.json")
        self._check_count()
        try:  # a quantized checkpoint (scripts/quantize.py): each linear's layout, read from shard 00
            self.layout: Optional[Layout] = read_layout(self.shards[0], linear_names(self.args))
        except CheckpointError as e:
            raise CheckpointError(f"{self.files[0]}: {e}") from None
        self.quantized = self.layout is not None
        check_world(self.args, world_size, folder, self.layout)
        self._check_shapes()

    @staticmethod
    def _load(path: Path) -> StateDict:
        sd = load_shard(path)
        return {k: v for k, v in sd.items() if not k.endswith(_DERIVED)}

    def _embedding_split(self) -> Tuple[int, int]:
        """(dim the embedding is cut along, vocabulary size), read from shard 00's shapes."""
        emb = self.shards[0].get("tok_embeddings.weight")
        dim = self.params.get("dim")
        if emb is None or emb.dim() != 2:
            raise CheckpointError(f"{self.files[0]} has no 2-D tok_embeddings.weight: it is not a LLaMA shard")
        n = len(self.shards)
        if n > 1 and emb.shape[1] == dim:  # whole rows: Llama 3 cuts the vocabulary
            return 0, emb.shape[0] * n
        return 1, emb.shape[0]

    @property
    def names(self) -> List[str]:
        return list(full_shapes(self.args, self.layout))

    def _check_count(self) -> None:
        """Compare each shard's number of layers with params.json's, before listing the names it implies."""
        for path, sd in zip(self.files, self.shards):
            layers = len({name.split(".")[1] for name in sd if name.startswith("layers.")})
            if layers != self.args.n_layers:
                raise CheckpointError(f"{path} holds {layers} layers but params.json says n_layers="
                                      f"{self.args.n_layers}: the shard and params.json come from different models; "
                                      "download or convert the checkpoint again")

    def _check_shapes(self) -> None:
        shapes = full_shapes(self.args, self.layout)
        quantized = [n + ".weight" for n in self.layout or ()]
        n = len(self.shards)
        for i, (path, sd) in enumerate(zip(self.files, self.shards)):
            check_names(sd, shapes, path, "the checkpoint is not a LLaMA checkpoint of this params.json")
            for name, shape in shapes.items():
                dim = self.embedding_dim if name == "tok_embeddings.weight" else shard_dim(name)
                expected = tuple(extent(region(shape, dim, i, n)))
                if tuple(sd[name].shape) != expected:
                    raise CheckpointError(
                        f"{path}: {name} has shape {tuple(sd[name].shape)} but params.json and {n} shard(s) "
                        f"imply {expected}: the shard disagrees with params.json or with the other shards; "
                        "download or convert the checkpoint again")
            for name in quantized:  # shard 00's dtypes were checked with the layout
                if sd[name].dtype != self.shards[0][name].dtype:
                    raise CheckpointError(f"{path}: {name} is {sd[name].dtype} but {self.files[0].name} holds it as "
                                          f"{self.shards[0][name].dtype}: the shards come from different "
                                          "quantizations; quantize the float checkpoint again")

    def rank_tensors(self, rank: int, world_size: int, dtype: Optional[torch.dtype] = None,
                     device: Union[str, torch.device] = "cpu", embedding_dim: int = 1, log_progress: bool = True,
                     into: Optional[Callable[[str], torch.Tensor]] = None) -> Iterator[Tuple[str, torch.Tensor]]:
        """Yield (name, this rank's slice) tensor by tensor, each complete and owned (no file pages).

        Slices follow the model's split (`shard_dim`); `embedding_dim` picks the embedding's. With
        `into`, each slice is copied into `into(name)` (a model's tensor, in its dtype) and yielded as it.
        """
        n = len(self.shards)
        shapes = full_shapes(self.args, self.layout)

        def dims(name: str) -> Tuple[Optional[int], Optional[int]]:  # (split in the files, split wanted)
            if name == "tok_embeddings.weight":
                return self.embedding_dim, embedding_dim
            return shard_dim(name), shard_dim(name)

        def wanted(name: str) -> Region:
            return region(shapes[name], dims(name)[1], rank, world_size)

        def held(name: str, i: int) -> Region:
            return region(shapes[name], dims(name)[0], i, n)

        needed = sorted({i for name in shapes if dims(name)[0] is not None for i in range(n)
                         if overlap(held(name, i), wanted(name))})
        total = sum(torch.Size(extent(wanted(name))).numel() for name in shapes)
        progress = Progress(f"rank {rank} of {world_size}: {len(needed)} of {n} shard(s) of {self.path}", total,
                            log_progress)
        for name in shapes:
            # Replicated tensors are the same in every shard: read one copy.
            sources = needed if dims(name)[0] is not None else needed[:1]
            parts = [(held(name, i), self.shards[i][name]) for i in sources]
            float_weight = parts[0][1].is_floating_point() and not name.endswith(_QUANT_AUX)
            out = assemble(wanted(name), parts, dtype if float_weight else None, device, release=release_pages,
                           out=None if into is None else into(name))
            progress.add(out)
            yield name, out
        progress.done()


def split_state_dict(full: StateDict, n: int) -> List[StateDict]:
    """Cut a whole-model state dict into `n` Meta-layout shards."""
    shards: List[StateDict] = [{} for _ in range(n)]
    for name, tensor in full.items():
        dim = shard_dim(name)
        if dim is not None and tensor.shape[dim] % n:
            raise CheckpointError(f"{name} of shape {tuple(tensor.shape)} cannot be split into {n} shards "
                                  f"along dim {dim}")
        pieces = [tensor] * n if dim is None else tensor.chunk(n, dim)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    return shards


@contextmanager
def atomic_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; rename it to `out_dir` only if the block succeeds."""
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists: choose a new output folder or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()  # plain mkdir, unlike mkdtemp, honours the umask
    try:
        yield tmp
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_shards(out_dir: str | os.PathLike, params: dict, shards: Iterable[StateDict],
                 tokenizer_path: Optional[str | os.PathLike] = None) -> Path:
    """Write a Meta-layout folder atomically; `shards` may be a generator, so one shard is in memory at a time."""
    with atomic_folder(out_dir) as tmp:
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        for i, shard in enumerate(shards):
            torch.save(shard, tmp / f"consolidated.{i:02d}.pth")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
    return Path(out_dir)


def write_checkpoint(out_dir: str | os.PathLike, params: dict, full: StateDict, num_shards: int = 1,
                     tokenizer_path: Optional[str | os.PathLike] = None) -> Path:
    """Write a whole-model state dict as a Meta-layout checkpoint of `num_shards` shards."""
    return write_shards(out_dir, params, split_state_dict(full, num_shards), tokenizer_path)


def write_meta(ckpt, out_dir: str | os.PathLike, num_shards: int) -> Path:
    """Write any opened checkpoint (see loading.open_checkpoint) in Meta's layout with `num_shards` shards,
    keeping its dtypes and, for a Meta source, its params.json and embedding split."""
    shards = (dict(ckpt.rank_tensors(r, num_shards, embedding_dim=ckpt.embedding_dim)) for r in range(num_shards))
    tokenizer = ckpt.path / "tokenizer.model"
    if not tokenizer.is_file():
        log.warning("%s has no tokenizer.model: copy one into %s before running it", ckpt.path, out_dir)
    return write_shards(out_dir, ckpt.params, shards, tokenizer if tokenizer.is_file() else None)
