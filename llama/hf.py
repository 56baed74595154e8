"""Hugging Face Llama folders: config.json plus model.safetensors or model-0000N-of-0000M.safetensors
with model.safetensors.index.json, read one rank's slices at a time and written from any checkpoint.

Hugging Face stores wq/wk rows in rotate-half order (see hf_permute); reading undoes it
per rank slice, which works because a rank's rows are whole heads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llama.checkpoint import (MetaCheckpoint, Progress, StateDict, assemble, atomic_folder, check_names, check_world,
                              confined, extent, ffn_params, full_shapes, model_args, read_json, region, shard_dim)
from llama.errors import CheckpointError
from llama.hf_tokenizer import check_export_chat_format, export_tokenizer
from llama.model import ModelArgs
from llama.quantize import describe

INDEX = "model.safetensors.index.json"
_DERIVED = ("rotary_emb.inv_freq",)  # a RoPE table older transformers saved; the model computes its own


def hf_permute(w: torch.Tensor, n_heads: int, inverse: bool = False) -> torch.Tensor:
    """Meta's interleaved RoPE rows (x0, x1), (x2, x3), ... -> Hugging Face's rotate-half rows
    (x0, x2, ..., x1, x3, ...), per head; `inverse` goes back. Rows are dim 0 (wq, wk, a LoRA B)."""
    head_dim = w.shape[0] // n_heads
    pairs = (2, head_dim // 2) if inverse else (head_dim // 2, 2)
    return w.reshape(n_heads, *pairs, -1).transpose(1, 2).reshape(w.shape)


def rope_heads(name: str, args: ModelArgs) -> Optional[int]:
    """How many heads tensor `name` holds when its rows are RoPE-rotated (wq, wk), else None."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


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


def hf_name(name: str) -> str:
    """transformers' LlamaForCausalLM name of Meta tensor `name`."""
    if name in _HF_TOP:
        return _HF_TOP[name]
    _, i, rest = name.split(".", 2)  # layers.{i}.{rest}
    return f"model.layers.{i}.{_HF_NAMES[rest]}"


def to_hf(name: str, t: torch.Tensor, args: ModelArgs) -> Tuple[str, torch.Tensor]:
    """Meta tensor `name` (whole) as transformers' LlamaForCausalLM names and orders it."""
    heads = rope_heads(name, args)
    return hf_name(name), t if heads is None else hf_permute(t, heads)


def meta_to_hf(full: StateDict, args: ModelArgs) -> StateDict:
    """A whole Meta state dict renamed and permuted for transformers' LlamaForCausalLM."""
    return dict(to_hf(name, t, args) for name, t in full.items())


def is_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def config_to_params(config: dict, path: Path) -> dict:
    """Meta params.json fields for a transformers LlamaConfig dict; anything this model lacks is refused."""
    if config.get("model_type") != "llama":
        raise CheckpointError(f"{path}: model_type is {config.get('model_type')!r}, not 'llama': only Llama "
                              "checkpoints are supported")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(f"{path}: RoPE scaling {rope_type!r} is not supported (this model implements plain "
                              "RoPE and Llama 3.1's 'llama3' scaling): use a checkpoint without other rope_scaling")
    quantization = config.get("quantization_config")
    if quantization:  # e.g. bitsandbytes NF4 (unsloth's *-bnb-4bit): packed weights and block scales
        method = " ".join(str(quantization[k]) for k in ("quant_method", "bnb_4bit_quant_type") if quantization.get(k))
        raise CheckpointError(f"{path}: the weights are quantized ({method or 'quantization_config'}), which this "
                              "library does not read: use the float checkpoint (for bnb-4bit folders, the same model "
                              "without -bnb-4bit) and quantize it here with quantize='int4' or 'int8'")
    if config.get("attention_bias") or config.get("mlp_bias") or config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: biases or an activation other than silu are not supported: use a plain "
                              "Llama checkpoint")
    try:
        dim, n_heads = config["hidden_size"], config["num_attention_heads"]
        if config.get("head_dim") not in (None, dim // n_heads):
            raise CheckpointError(f"{path}: head_dim={config['head_dim']} differs from hidden_size / "
                                  "num_attention_heads, which this model requires")
        return {
            "dim": dim, "n_layers": config["num_hidden_layers"], "n_heads": n_heads,
            "n_kv_heads": config.get("num_key_value_heads") or n_heads, "vocab_size": config["vocab_size"],
            "norm_eps": config.get("rms_norm_eps", 1e-6),
            "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            **ffn_params(dim, config["intermediate_size"]),
            **(_llama3_rope_params(rope) if rope_type == "llama3" else {}),
            **({"max_seq_len": config["max_position_embeddings"]} if config.get("max_position_embeddings") else {}),
        }
    except KeyError as e:
        raise CheckpointError(f"{path} lacks {e}: it is not a complete Llama config.json") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path} has invalid sizes ({e}): restore the file from the original download")


def _llama3_rope_params(rope: dict) -> dict:
    return {"use_scaled_rope": True, "rope_scale_factor": rope["factor"],
            "rope_low_freq_factor": rope["low_freq_factor"], "rope_high_freq_factor": rope["high_freq_factor"],
            "rope_original_max_seq_len": rope["original_max_position_embeddings"]}


def params_to_config(args: ModelArgs, dtype: torch.dtype, bos_id: Optional[int] = 1,
                     eos_ids: Union[int, List[int], None] = 2) -> dict:
    rope_scaling, max_positions = None, args.max_seq_len
    if args.use_scaled_rope:
        # transformers wants more positions than the context the scaling starts from: the one it stretches to
        max_positions = max(max_positions, int(args.rope_original_max_seq_len * args.rope_scale_factor))
        rope_scaling = {"rope_type": "llama3", "factor": args.rope_scale_factor,
                        "low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
                        "original_max_position_embeddings": args.rope_original_max_seq_len}
    return {"rope_scaling": rope_scaling,
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "max_position_embeddings": max_positions, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "torch_dtype": str(dtype).replace("torch.", ""),
        "bos_token_id": bos_id, "eos_token_id": eos_ids,
    }


def _open(path: Path):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} could not be read ({e}): the file is truncated or corrupted; download "
                              "or convert it again") from None


class HFCheckpoint:
    """A validated Hugging Face Llama folder; the same interface as checkpoint.MetaCheckpoint."""

    embedding_dim = 1  # written back to Meta's layout the Llama 1/2 way
    quantized = False
    layout = None  # never quantized

    def __init__(self, folder: Path, world_size: int = 1):
        self.path = folder
        config_path = folder / "config.json"
        config = read_json(config_path)
        self.params = config_to_params(config, config_path)
        self.args = model_args(self.params, config_path)
        self.files = self._find_files()
        self.headers: Dict[str, Tuple[Path, Tuple[int, ...]]] = {}  # HF name -> (file, shape)
        for path in self.files:
            with _open(path) as f:
                for key in f.keys():
                    if not key.endswith(_DERIVED):
                        self.headers[key] = (path, tuple(f.get_slice(key).get_shape()))
        tied = bool(config.get("tie_word_embeddings", False))
        shapes = full_shapes(self.args)
        # A tied model's output matrix is its embedding; some tied folders still hold a copy as lm_head.
        self.sources = {name: hf_name("tok_embeddings.weight" if tied and name == "output.weight" else name)
                        for name in shapes}
        found = set(self.headers) - ({"lm_head.weight"} if tied else set())
        check_names(found, self.sources.values(), folder, "it is not a Llama checkpoint of this config.json")
        for name, shape in shapes.items():
            path, found_shape = self.headers[self.sources[name]]
            if found_shape != shape:
                raise CheckpointError(f"{path}: {self.sources[name]} has shape {found_shape} but config.json "
                                      f"implies {shape}: download or convert the checkpoint again")
        check_world(self.args, world_size, folder)

    def _find_files(self) -> List[Path]:
        index = self.path / INDEX
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map: restore it from the original download")
            names = weight_map.values()
            if not all(isinstance(name, str) for name in names):
                raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
            files = [confined(self.path, name, index) for name in sorted(set(names))]
        else:
            files = [self.path / "model.safetensors"]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: a Hugging Face folder needs model.safetensors, or "
                                        f"the files {INDEX} lists; download them again")
        return files

    def rank_tensors(self, rank: int, world_size: int, dtype: Optional[torch.dtype] = None,
                     device: Union[str, torch.device] = "cpu", embedding_dim: int = 1, log_progress: bool = True,
                     into: Optional[Callable[[str], torch.Tensor]] = None) -> Iterator[Tuple[str, torch.Tensor]]:
        """Yield (Meta name, this rank's slice) tensor by tensor, reading only the slices from disk
        (with `into`, into the given tensors, as checkpoint.MetaCheckpoint.rank_tensors)."""
        shapes = full_shapes(self.args)

        def wanted(name: str):
            return region(shapes[name], embedding_dim if name == "tok_embeddings.weight" else shard_dim(name),
                          rank, world_size)

        total = sum(torch.Size(extent(wanted(name))).numel() for name in shapes)
        progress = Progress(f"rank {rank} of {world_size}: {len(self.files)} file(s) of {self.path}", total,
                            log_progress)
        for name in shapes:
            source = self.sources[name]
            # Open the file per tensor: closing unmaps it, so the pages read do not stay resident.
            with _open(self.headers[source][0]) as f:
                whole = region(shapes[name], None, 0, 1)
                out = assemble(wanted(name), [(whole, f.get_slice(source))], dtype, device,
                               out=None if into is None else into(name))
            if rope_heads(name, self.args) is not None:  # this rank's rows are whole heads
                out.copy_(hf_permute(out, out.shape[0] // self.args.head_dim, inverse=True))
            progress.add(out)
            yield name, out
        progress.done()


def _token_ids(folder: Path) -> Tuple[Optional[int], Union[int, List[int], None]]:
    """(BOS, EOS) for config.json from the folder's tokenizer; Llama 3 lists all its stop ids."""
    from llama.tokenizer import find_tokenizer, load_tokenizer

    path = Path(find_tokenizer(folder))
    if not path.is_file():
        return None, None
    tok = load_tokenizer(path)
    stops = sorted(tok.stop_ids)
    return tok.bos_id, stops[0] if len(stops) == 1 else stops


def write_hf(ckpt: Union[MetaCheckpoint, HFCheckpoint], out_dir: str | os.PathLike,
             max_file_bytes: int = 5 * 2**30, chat_format: Optional[str] = None) -> Path:
    """Write any opened checkpoint (see loading.open_checkpoint) as a Hugging Face Llama folder,
    atomically, in safetensors files of at most `max_file_bytes` (one file when it fits). The
    tokenizer_config.json's chat template is `chat_format`'s ('llama2', 'llama3', 'alpaca'), the
    format the model was fine-tuned on; by default a Hugging Face source keeps its own and a Meta
    one gets its tokenizer's default format."""
    args = ckpt.args
    if ckpt.quantized:
        raise CheckpointError(f"{ckpt.path} is quantized ({describe(ckpt.layout)}): a Hugging Face folder holds "
                              "float weights; convert the float checkpoint")
    check_export_chat_format(ckpt.path, chat_format)
    with atomic_folder(out_dir) as tmp:
        groups: List[List[str]] = []
        group: Dict[str, torch.Tensor] = {}
        size, dtype = 0, None
        for name, t in ckpt.rank_tensors(0, 1):
            key, t = to_hf(name, t, args)
            nbytes = t.numel() * t.element_size()
            if group and size + nbytes > max_file_bytes:
                save_file(group, tmp / f"part{len(groups)}", metadata={"format": "pt"})
                groups.append(list(group))
                group, size = {}, 0
            group[key] = t.contiguous()
            size += nbytes
            dtype = dtype or t.dtype
        save_file(group, tmp / f"part{len(groups)}", metadata={"format": "pt"})
        groups.append(list(group))

        names = ["model.safetensors"] if len(groups) == 1 else [
            f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        for i, name in enumerate(names):
            os.rename(tmp / f"part{i}", tmp / name)
            os.chmod(tmp / name, tmp.stat().st_mode & 0o666)  # safetensors writes 0600; follow the folder's umask
        if len(groups) > 1:
            weight_map = {key: file for file, keys in zip(names, groups) for key in keys}
            (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(params_to_config(args, dtype, *_token_ids(ckpt.path)), indent=2)
                                         + "\n")
        export_tokenizer(ckpt.path, tmp, chat_format)
    return Path(out_dir)
