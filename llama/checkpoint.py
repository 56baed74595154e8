"""Find, validate, load, split and write Meta-layout checkpoints.

A Meta checkpoint folder holds `params.json` and one `consolidated.NN.pth` per model-parallel
shard. Each tensor is cut along the dimension its fairscale layer splits:
column-parallel weights along dim 0, row-parallel weights and the embedding along dim 1,
norms replicated.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import uuid
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

log = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]

_COLUMN = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
_ROW = ("wo.weight", "w2.weight", "tok_embeddings.weight")


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be used as it is."""


def shard_dim(name: str) -> Optional[int]:
    """The dimension along which Meta's checkpoints split tensor `name`; None if replicated."""
    if name.endswith(_COLUMN):
        return 0
    if name.endswith(_ROW):
        return 1
    return None


def load_params(ckpt_dir: str | os.PathLike) -> dict:
    path = Path(ckpt_dir) / "params.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a Meta checkpoint folder needs params.json beside its shards")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): restore the file from the original download")
    if not isinstance(params, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(params).__name__}")
    return params


def find_shards(ckpt_dir: str | os.PathLike) -> List[Path]:
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist: pass --ckpt_dir with a folder "
                              "holding params.json and consolidated.NN.pth")
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"no consolidated.NN.pth shards in {str(folder)!r}: point --ckpt_dir at a Meta "
                              "checkpoint folder")
    expected = [folder / f"consolidated.{i:02d}.pth" for i in range(len(shards))]
    if shards != expected:
        raise CheckpointError(f"shards in {folder} are not numbered 00..{len(shards) - 1:02d}: "
                              f"found {[p.name for p in shards]}")
    return shards


def load_shard(path: str | os.PathLike) -> StateDict:
    """Load one shard to CPU, memory-mapped, refusing anything but plain tensors."""
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and weights_only loading refused it "
                              f"({str(e).splitlines()[0]}): re-save it as a plain state dict of tensors")
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(f"{path} could not be read ({str(e).splitlines()[0]}): the file is truncated or "
                              "corrupted; download or convert it again")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors: re-save it with torch.save(model.state_dict())")
    return sd


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


def merge_state_dicts(shards: List[StateDict]) -> StateDict:
    """Inverse of split_state_dict."""
    merged: StateDict = {}
    for name in shards[0]:
        dim = shard_dim(name)
        merged[name] = shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim)
    return merged


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


def write_checkpoint(out_dir: str | os.PathLike, params: dict, full: StateDict, num_shards: int = 1,
                     tokenizer_path: Optional[str | os.PathLike] = None) -> Path:
    """Write a Meta-layout checkpoint folder atomically: params.json, consolidated.NN.pth, tokenizer.model."""
    shards = split_state_dict(full, num_shards)
    with atomic_folder(out_dir) as tmp:
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        for i, shard in enumerate(shards):
            torch.save(shard, tmp / f"consolidated.{i:02d}.pth")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
    return Path(out_dir)


def load_rank_state_dict(ckpt_dir: str | os.PathLike, rank: int, world_size: int) -> StateDict:
    """This model-parallel rank's tensors (the shard count must equal `world_size`)."""
    shards = find_shards(ckpt_dir)
    if len(shards) != world_size:
        raise CheckpointError(f"{ckpt_dir} has {len(shards)} shard(s) but the model-parallel size is {world_size}: "
                              f"run with --nproc_per_node {len(shards)}, or reshard with "
                              f"scripts/reshard.py --num_shards {world_size}")
    return load_shard(shards[rank])


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved RoPE rows -> Hugging Face's rotate-half rows, per head."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of hf_permute."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


_HF_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}


def meta_to_hf(full: StateDict, n_heads: int, n_kv_heads: int) -> StateDict:
    """A whole Meta state dict renamed and permuted for transformers' LlamaForCausalLM."""
    out: StateDict = {}
    for name, t in full.items():
        if name in _HF_TOP:
            out[_HF_TOP[name]] = t
            continue
        _, i, rest = name.split(".", 2)  # layers.{i}.{rest}
        if rest == "attention.wq.weight":
            t = hf_permute(t, n_heads)
        elif rest == "attention.wk.weight":
            t = hf_permute(t, n_kv_heads)
        out[f"model.layers.{i}.{_HF_NAMES[rest]}"] = t
    return out
