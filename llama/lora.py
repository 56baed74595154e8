"""PEFT LoRA adapters, merged into a base checkpoint's weights as they are read.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or
`adapter_model.bin`), as PEFT's `save_pretrained` writes them for a LlamaForCausalLM. Each
adapted linear module carries lora_A (r, in) and lora_B (out, r); merged, its weight becomes
W + s * B @ A, with s = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`, after
`rank_pattern` / `alpha_pattern` pick r and lora_alpha per module. An adapted embedding carries
lora_embedding_A (r, vocab) and lora_embedding_B (dim, r), and gains s * (B @ A).T.
`modules_to_save` tensors, and the `base_layer` copies PEFT saves of an adapted embedding or
lm_head, replace the base tensor whole (before its delta, if it has one).

Adapters are trained on Hugging Face's layout, whose q_proj / k_proj rows are in rotate-half
order: B's rows go back to Meta's order (`hf_permute`) once, when the adapter is opened, so one
adapter fits Meta-layout and Hugging Face bases alike.

A rank merges only its slice: the slice covering rows R and columns C of W gets
s * B[R] @ A[:, C], added in blocks of rows, so memory stays near one copy of the weights.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from safetensors import SafetensorError

from llama.checkpoint import (MetaCheckpoint, Region, assemble, full_shapes, load_shard, read_json, region,
                              release_pages, shard_dim)
from llama.errors import CheckpointError
from llama.hf import HFCheckpoint, _open, hf_name, hf_permute, rope_heads
from llama.model import ModelArgs
from llama.quantize import describe

log = logging.getLogger(__name__)

CONFIG = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
BIN = "adapter_model.bin"
_PREFIX = "base_model.model."  # PEFT's names for a wrapped LlamaForCausalLM's modules
_EMBEDDING, _OUTPUT = "model.embed_tokens", "lm_head"
_FACTORS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B"}

# Options that would make the merged weight something other than W + s * B @ A, each with why.
_REFUSED = {
    "use_dora": "DoRA rescales each weight column by a learned magnitude",
    "lora_bias": "lora_bias adds a trained bias, and this model's linear layers have none",
    "fan_in_fan_out": "fan_in_fan_out stores weights transposed (GPT-2's Conv1D), which no Llama layer does",
    "use_qalora": "QA-LoRA pools the layer input in groups",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens, which no merge can do",
    "layer_replication": "layer_replication changes the number of layers",
    "trainable_token_indices": "trainable tokens are a separate embedding update",
    "target_parameters": "target_parameters adapts raw parameters rather than modules",
    "ensure_weight_tying": "ensure_weight_tying ties adapters across the embedding and lm_head",
}
# Settings that do not change the merged weights (training or bookkeeping), or that are read below.
_KNOWN = {
    "peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "init_lora_weights", "bias",
    "lora_dropout", "inference_mode", "task_type", "base_model_name_or_path", "revision", "peft_version",
    "auto_mapping", "megatron_config", "megatron_core", "runtime_config", "qalora_group_size", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", *_REFUSED,
}
# Initialisations that change the base weights themselves, which the adapter then expects.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


def _unset(value) -> bool:
    return value is None or value is False or value in ({}, [], "")


@dataclass(frozen=True, eq=False)
class Delta:
    """One tensor's low-rank update s * left @ right in Meta's names and row order: left (out, r)
    and right (r, in) in float32."""

    left: torch.Tensor
    right: torch.Tensor
    scaling: float

    _BLOCK_NUMEL = 4 << 20  # elements of the weight updated at a time

    def add_to_(self, t: torch.Tensor, where: Region) -> None:
        """Add the delta's `where` region (rows, columns of the whole weight) to slice `t` in place,
        in blocks of rows, computing only that region."""
        (r0, r1), (c0, c1) = where
        left = self.left[r0:r1].to(t.device)
        right = self.right[:, c0:c1].to(t.device)
        rows = max(1, self._BLOCK_NUMEL // max(1, c1 - c0))
        for lo in range(0, r1 - r0, rows):
            block = t[lo : lo + rows]
            # float32 sums for a bf16/fp16 base; for a float32 base .float() is the block itself
            block.copy_(block.float().addmm_(left[lo : lo + rows], right, alpha=self.scaling))


class LoraAdapter:
    """A PEFT LoRA adapter folder, validated against a base model's ModelArgs when opened.

    Opening reads the config, the LoRA factors (small) and the names and shapes of any tensors
    it replaces (read later, slice by slice); anything that cannot be merged is refused then,
    before any base weight is read. `merged` then applies it to a rank's stream of tensors.
    """

    def __init__(self, folder: str | os.PathLike, args: ModelArgs):
        self.path = Path(folder)
        self.args = args
        self.shapes = full_shapes(args)
        # Hugging Face module name -> Meta tensor name, for every module with a weight
        self._meta = {hf_name(name)[: -len(".weight")]: name for name in self.shapes}
        if not self.path.is_dir():
            raise FileNotFoundError(f"LoRA adapter folder {str(self.path)!r} does not exist: pass --lora with a "
                                    f"PEFT adapter folder ({CONFIG} + {SAFETENSORS} or {BIN})")
        self.config = self._read_config()
        self.weights = self._weights_file()
        self._state: Optional[Dict[str, torch.Tensor]] = None  # a memory-mapped adapter_model.bin
        shapes, factors = self._read_weights()
        self.replaced: Dict[str, str] = {}  # Meta name -> key of the tensor replacing it
        lora: Dict[str, Dict[str, torch.Tensor]] = {}  # HF module -> {"A": ..., "B": ...}
        for key, shape in shapes.items():
            self._sort_key(key, shape, factors, lora)
        self._check_modules(set(lora))
        self.deltas: Dict[str, Delta] = {name: self._delta(m, lora[m]) for m, name in self._meta.items() if m in lora}
        log.info("LoRA adapter %s: %d module(s) adapted, %d tensor(s) replaced", self.path, len(self.deltas),
                 len(self.replaced))

    # -- reading ---------------------------------------------------------------------------

    def _read_config(self) -> dict:
        path = self.path / CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: a PEFT adapter folder holds {CONFIG} beside its weights "
                                    "(save the adapter with PeftModel.save_pretrained)")
        config = read_json(path)
        if config.get("peft_type") != "LORA":
            raise CheckpointError(f"{path}: peft_type is {config.get('peft_type')!r}, not 'LORA': only LoRA "
                                  "adapters can be merged")
        for key, why in _REFUSED.items():
            if not _unset(config.get(key)):
                raise CheckpointError(f"{path}: {key}={config[key]!r} is not supported ({why}): merge it with "
                                      "peft's merge_and_unload and load the result as a plain checkpoint")
        if config.get("bias", "none") != "none":
            raise CheckpointError(f"{path}: bias={config['bias']!r} is not supported (this model's layers have no "
                                  "biases to train): use an adapter trained with bias='none'")
        init = config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise CheckpointError(f"{path}: init_lora_weights={init!r} changed the base weights during training, "
                                  "and this adapter only fits those: save it converted (PEFT's "
                                  "path_initial_model_for_weight_conversion) or merge it with peft")
        unknown = sorted(k for k in set(config) - _KNOWN if not _unset(config[k]))
        if unknown:
            raise CheckpointError(f"{path}: {', '.join(unknown)} set, which this loader does not know and which "
                                  "may change how the adapter applies: merge it with peft's merge_and_unload")
        for key in ("r", "lora_alpha"):
            if not _positive_number(config.get(key), integer=key == "r"):
                raise CheckpointError(f"{path}: {key}={config.get(key)!r} must be a positive "
                                      f"{'integer' if key == 'r' else 'number'}")
        for key in ("rank_pattern", "alpha_pattern"):
            pattern = config.get(key) or {}
            if not isinstance(pattern, dict) or not all(
                    isinstance(k, str) and _positive_number(v, integer=key == "rank_pattern")
                    for k, v in pattern.items()):
                raise CheckpointError(f"{path}: {key} must map module names or patterns to positive "
                                      f"{'integers' if key == 'rank_pattern' else 'numbers'}")
        return config

    def _weights_file(self) -> Path:
        for name in (SAFETENSORS, BIN):  # PEFT prefers safetensors when both are present
            if (self.path / name).is_file():
                return self.path / name
        raise FileNotFoundError(f"{self.path} has neither {SAFETENSORS} nor {BIN}: copy the adapter's weights "
                                "file beside its adapter_config.json")

    def _read_weights(self) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, torch.Tensor]]:
        """(every key's shape, the LoRA factors in float32)."""
        def is_factor(key: str) -> bool:
            return key.endswith(tuple(_FACTORS))

        if self.weights.name == BIN:
            self._state = load_shard(self.weights)  # weights_only, memory-mapped
            shapes = {k: tuple(v.shape) for k, v in self._state.items()}
            return shapes, {k: v.float() for k, v in self._state.items() if is_factor(k)}
        try:
            with _open(self.weights) as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                return shapes, {k: f.get_tensor(k).float() for k in f.keys() if is_factor(k)}
        except (SafetensorError, RuntimeError, OSError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{self.weights} could not be read ({e}): the file is truncated or corrupted; "
                                  "save or download the adapter again") from None

    # -- validation ------------------------------------------------------------------------

    def _sort_key(self, key: str, shape: Tuple[int, ...], factors: Dict[str, torch.Tensor],
                  lora: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """File it as a LoRA factor (into `lora`) or a replacement (into self.replaced), or refuse it."""
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else None
        suffix = next((s for s in _FACTORS if name is not None and name.endswith("." + s)), None)
        module = None if name is None else name[: -len(suffix) - 1] if suffix else name.rpartition(".")[0]
        # PEFT saves an adapted embedding's or lm_head's base weight too, as MODULE.base_layer.weight
        if suffix is None and module is not None and module.endswith(".base_layer"):
            module = module[: -len(".base_layer")]
        if module not in self._meta or (suffix is None and not name.endswith(".weight")):
            raise CheckpointError(f"{self.weights}: {key} is not a tensor of a PEFT adapter for this Llama model "
                                  f"(expected names like {_PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight): "
                                  "the adapter belongs to another architecture")
        meta = self._meta[module]
        full = self.shapes[meta]
        if suffix is None:
            if shape != full:
                raise CheckpointError(f"{self.weights}: {key} has shape {shape} but the base model's "
                                      f"{meta} is {full}: the adapter was trained on a different model (or a "
                                      "resized vocabulary)")
            self.replaced[meta] = key
            return
        if len(full) != 2 or (suffix.startswith("lora_embedding") != (module == _EMBEDDING)):
            raise CheckpointError(f"{self.weights}: {key} does not fit {module}, which is "
                                  f"{'an embedding' if module == _EMBEDDING else 'not a linear layer'}")
        lora.setdefault(module, {})[_FACTORS[suffix]] = factors[key]

    def _check_modules(self, adapted: set) -> None:
        """The modules the file adapts and replaces are those the config names, and exist here."""
        config_path = self.path / CONFIG
        targets = self._targets()
        if adapted != targets:
            extra, missing = sorted(adapted - targets), sorted(targets - adapted)
            raise CheckpointError(f"{self.weights} and {config_path} disagree: LoRA weights for modules the "
                                  f"config does not target: {extra[:5]}; targeted modules without weights: "
                                  f"{missing[:5]}: the files come from different adapters")
        saved = self._saved()
        # PEFT may save the embedding and lm_head whole besides (save_embedding_layers), e.g. after a resize
        allowed = saved | {self._meta[_EMBEDDING], self._meta[_OUTPUT]}
        replaced = set(self.replaced)
        if not saved <= replaced <= allowed:
            raise CheckpointError(f"{self.weights} and {config_path} disagree on modules_to_save: tensors the "
                                  f"config saves but the file lacks: {sorted(saved - replaced)[:5]}; replacements "
                                  f"it does not name: {sorted(replaced - allowed)[:5]}")

    def _lora_modules(self) -> List[str]:
        """Modules LoRA can adapt here: every linear layer, the embedding and lm_head (not the norms)."""
        return [m for m, name in self._meta.items() if len(self.shapes[name]) == 2]

    def _targets(self) -> set:
        """The modules PEFT's target_modules, layers_to_transform, exclude_modules and modules_to_save
        select, with PEFT's matching rules."""
        c, path = self.config, self.path / CONFIG
        modules, targets = self._lora_modules(), c.get("target_modules")
        short = sorted({m.rpartition(".")[2] for m in modules})
        if isinstance(targets, str):
            if targets.lower() == "all-linear":  # every linear layer but the output head
                chosen = {m for m in modules if m not in (_EMBEDDING, _OUTPUT)}
            else:
                try:
                    chosen = {m for m in modules if re.fullmatch(targets, m)}
                except re.error as e:
                    raise CheckpointError(f"{path}: target_modules {targets!r} is not a valid regex ({e})") from None
                if not chosen:
                    raise CheckpointError(f"{path}: target_modules {targets!r} matches no module of this Llama "
                                          f"model (its LoRA-able modules: {', '.join(short)})")
        elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
            unknown = [t for t in targets if not any(_names(m, t) for m in modules)]
            if unknown:
                raise CheckpointError(f"{path}: target_modules {unknown} are not modules of this Llama model, "
                                      f"which has {', '.join(short)}: the adapter is for another architecture")
            chosen = {m for m in modules if any(_names(m, t) for t in targets) and self._in_layers(m)}
        else:
            raise CheckpointError(f"{path}: target_modules must be a list of module names or a regex string")
        exclude = c.get("exclude_modules")
        if isinstance(exclude, str):
            chosen = {m for m in chosen if not re.fullmatch(exclude, m)}
        elif exclude:
            chosen = {m for m in chosen if not any(_names(m, e) for e in exclude)}
        saved = c.get("modules_to_save") or []
        return {m for m in chosen if not any(re.match(rf"(^|.*\.){s}($|\..*)", m) for s in saved)}

    def _in_layers(self, module: str) -> bool:
        """PEFT's layers_to_transform filter for list targets: the module's layer index is listed."""
        layers, pattern = self.config.get("layers_to_transform"), self.config.get("layers_pattern")
        if layers is None or layers == []:
            return True
        patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
        regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
        match = next((m for m in (re.match(r, module) for r in regexes) if m), None)
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == layers if isinstance(layers, int) else index in layers

    def _saved(self) -> set:
        """Meta tensors that modules_to_save replaces: every weight inside a module whose name ends
        with one of its entries (PEFT's plain suffix rule)."""
        entries = self.config.get("modules_to_save") or []
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise CheckpointError(f"{self.path / CONFIG}: modules_to_save must be a list of module names")
        modules = {prefix for m in self._meta for prefix in _prefixes(m)}
        unknown = [e for e in entries if not any(m.endswith(e) for m in modules)]
        if unknown:
            raise CheckpointError(f"{self.path / CONFIG}: modules_to_save {unknown} are not modules of this Llama "
                                  "model (e.g. embed_tokens, lm_head, norm)")
        chosen = [m for m in modules if any(m.endswith(e) for e in entries)]
        return {name for leaf, name in self._meta.items() if any(leaf == m or leaf.startswith(m + ".")
                                                                  for m in chosen)}

    def _delta(self, module: str, f: Dict[str, torch.Tensor]) -> Delta:
        """Module `module`'s factors checked against the base and the config, in Meta's order."""
        meta = self._meta[module]
        out, inp = self.shapes[meta]
        r, alpha = self._rank_and_alpha(module)
        embedding = module == _EMBEDDING
        names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        # PEFT's embedding factors are A (r, vocab) and B (dim, r): the delta (vocab, dim) is A.T @ B.T
        expected = {"A": (r, out) if embedding else (r, inp), "B": (inp, r) if embedding else (out, r)}
        for part, name in zip("AB", names):
            key = f"{_PREFIX}{module}.{name}"
            if part not in f:
                raise CheckpointError(f"{self.weights}: {key} is missing (every LoRA module has an A and a B): "
                                      "save or download the adapter again")
            if tuple(f[part].shape) != expected[part]:
                raise CheckpointError(f"{self.weights}: {key} has shape {tuple(f[part].shape)} but the base "
                                      f"model's {meta} {(out, inp)} with r={r} needs {expected[part]}: the adapter "
                                      "was trained on a different model, or its config's r / rank_pattern differs")
            if not torch.isfinite(f[part]).all():
                raise CheckpointError(f"{self.weights}: {key} holds NaN or inf values: the adapter is damaged "
                                      "(or diverged in training); save or download it again")
        left, right = (f["A"].T, f["B"].T) if embedding else (f["B"], f["A"])
        heads = rope_heads(meta, self.args)
        if heads is not None:  # B's rows are q/k rows: back from Hugging Face's rotate-half order
            left = hf_permute(left, heads, inverse=True)
        scaling = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        return Delta(left.contiguous(), right.contiguous(), scaling)

    def _rank_and_alpha(self, module: str) -> Tuple[int, float]:
        """r and lora_alpha for `module`: the first rank_pattern / alpha_pattern key that matches the
        end of its name at a dot (PEFT's rule), else the config's r / lora_alpha."""
        def pick(pattern: dict, default):
            for key, value in pattern.items():
                if re.match(rf"(.*\.)?({key})$", module):
                    return value
            return default

        c = self.config
        return pick(c.get("rank_pattern") or {}, c["r"]), pick(c.get("alpha_pattern") or {}, c["lora_alpha"])

    # -- merging ---------------------------------------------------------------------------

    def merged(self, tensors: Iterable[Tuple[str, torch.Tensor]], rank: int, world_size: int,
               embedding_dim: int = 1) -> Iterator[Tuple[str, torch.Tensor]]:
        """`tensors` (a checkpoint's rank_tensors(rank, world_size, embedding_dim=...)) with the adapter
        merged: each (Meta name, this rank's slice), overwritten and/or updated in place when the adapter
        touches it, else passed through."""
        for name, t in tensors:
            if name in self.replaced or name in self.deltas:
                dim = embedding_dim if name == "tok_embeddings.weight" else shard_dim(name)
                where = region(self.shapes[name], dim, rank, world_size)
                if name in self.replaced:
                    self._replace_(name, where, t)
                if name in self.deltas:
                    self.deltas[name].add_to_(t, where)
            yield name, t

    def _replace_(self, name: str, where: Region, t: torch.Tensor) -> None:
        """Overwrite slice `t` (region `where` of tensor `name`) with the adapter's saved copy, in place."""
        key, whole = self.replaced[name], region(self.shapes[name], None, 0, 1)
        if self._state is not None:
            assemble(where, [(whole, self._state[key])], t.dtype, t.device, release=release_pages, out=t)
            return
        with _open(self.weights) as f:
            assemble(where, [(whole, f.get_slice(key))], t.dtype, t.device, out=t)


class MergedCheckpoint:
    """A checkpoint seen with an adapter merged: the interface write_meta and write_hf read."""

    def __init__(self, ckpt: Union[MetaCheckpoint, HFCheckpoint], adapter: LoraAdapter):
        self.ckpt, self.adapter = ckpt, adapter

    def __getattr__(self, name: str):
        return getattr(self.ckpt, name)

    def rank_tensors(self, rank: int, world_size: int, dtype: Optional[torch.dtype] = None,
                     device: Union[str, torch.device] = "cpu", embedding_dim: int = 1,
                     log_progress: bool = True) -> Iterator[Tuple[str, torch.Tensor]]:
        tensors = self.ckpt.rank_tensors(rank, world_size, dtype, device, embedding_dim, log_progress)
        return self.adapter.merged(tensors, rank, world_size, embedding_dim)


def open_adapter(path: str | os.PathLike, ckpt: Union[MetaCheckpoint, HFCheckpoint]) -> LoraAdapter:
    """The adapter at `path`, validated for the opened base checkpoint `ckpt`."""
    if ckpt.quantized:
        mode = describe(ckpt.layout).split()[0]
        raise CheckpointError(f"{ckpt.path} is an {mode} checkpoint: a LoRA adapter merges into float weights; "
                              f"load the float checkpoint with the adapter and quantize=\"{mode}\" instead")
    return LoraAdapter(path, ckpt.args)


def _names(module: str, target: str) -> bool:
    """PEFT's rule for one target_modules entry: the whole name, or its end after a dot."""
    return module == target or module.endswith("." + target)


def _prefixes(module: str) -> List[str]:
    """'a.b.c' -> ['a', 'a.b', 'a.b.c']: the module and every module it sits in."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _positive_number(value, integer: bool) -> bool:
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and value > 0
