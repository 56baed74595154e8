"""Per-request LoRA adapters on one base: many PEFT adapters held beside the base weights, never merged
into them, each request choosing one (or none), so that requests for different adapters and for the
base share one batch and one copy of the base weights (S-LoRA's and Punica's idea, in plain PyTorch).

**Opening.** An adapter folder is read and checked exactly as for merging (llama.lora.LoraAdapter:
unsupported PEFT options refused by name, target modules and every factor's shape against the base),
and one more rule: a tensor an adapter would replace whole cannot be shared by a batch, so
`modules_to_save` is refused, and so is a saved embedding or lm_head that differs from the base's
(PEFT saves an adapted one's base weights beside its factors: equal to the base's, they are ignored).
What is kept is the factors, this rank's slices, in the dtype the update computes in (`factor_dtype`):
the adapter's own size.

**The layers.** Every linear of the model and its embedding become an `AdaptedLinear`: the base layer
as it was (float, int8, int4, fairscale's: whatever module it is, it is called as it is) and the
factors of every adapter slot, stacked. For input x and each row's slot (0: no adapter):

    h = x @ down.T                       (..., S)  every slot's A at once (the embedding: rows of down)
    h = h * (owner == the row's slot)    only the row's own slot's columns
    y = base(x) + h @ up                 B, times the scaling: one batched matmul over the fused parts

A slot takes its adapter's own rows (its rank) in each layer, so it costs the adapter's own size, and
the cost of a step grows with the loaded ranks, not with how many adapters the batch mixes. The shapes
stay the same as adapters come and go within the slots there are: a compiled decode step keeps its
graphs; only a new slot (or a larger rank in one) reallocates, after which the runner compiles again.
Row-parallel layers (wo, w2) hold their rank's columns of A and sum h across ranks (r numbers a token)
before B; column-parallel ones their rows of B; the embedding and the output layer, whose outputs are
gathered, the whole factors.

**How rows reach the layers.** The runner passes each row's slot as one more argument of the model's
forward (`adapters`, (B,) long; None when no row of the step uses an adapter, and then nothing extra
runs): the data path stays explicit, and it is a graph input of the compiled step, where an attribute
set on the modules before each call would be frozen into a graph compiled without module guards.

**Loading at run time** (llama.engine): a load opens the adapter in the caller's thread, then takes a
slot between two steps, on every rank alike (rank 0 sends it with a plan; the other ranks open the
folder themselves and all agree before any of them uses it). An unload forgets the name at once and
frees the slot once the requests using it have finished; a name loaded again gets a new slot and a new
prefix-cache salt, so no request reuses the old adapter's cached keys and values.
"""
from __future__ import annotations

import hashlib
import heapq
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.mappings import reduce_from_model_parallel_region
from torch import nn

from llama.checkpoint import region, shard_dim
from llama.distributed import model_parallel
from llama.errors import CheckpointError
from llama.lora import CONFIG, LoraAdapter

EMBEDDING, OUTPUT = "tok_embeddings.weight", "output.weight"
MAX_NAME = 256

# (down (r, in), up (r, out)) of one fused part of one layer: this rank's slices, B times the scaling
Factors = Tuple[torch.Tensor, torch.Tensor]


@dataclass(eq=False)
class AdapterWeights:
    """An opened adapter, ready to copy into a slot: factors by layer path and fused part."""

    path: str
    factors: Dict[str, Dict[int, Factors]]
    signature: str  # digest of every layer's rank: every rank must have opened the same adapter

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for parts in self.factors.values() for f in parts.values()
                   for t in f)


def open_weights(path: str | os.PathLike, model: nn.Module) -> AdapterWeights:
    """The PEFT adapter at `path`, checked against `model` (loaded, this rank's part) for use unmerged."""
    rank, world = model_parallel()
    adapter = LoraAdapter(path, model.params)
    _check_replaced(adapter, model, rank, world)
    device, dtype = model.norm.weight.device, factor_dtype(model)
    factors: Dict[str, Dict[int, Factors]] = {}
    for name, delta in adapter.deltas.items():
        layer, part = _layer_of(model, name)
        # the embedding and the output layer gather their outputs: whole factors on every rank
        dim = None if name in (EMBEDDING, OUTPUT) else shard_dim(name)
        (r0, r1), (c0, c1) = region(adapter.shapes[name], dim, rank, world)
        if name == EMBEDDING:  # delta[token] = s * left[token] @ right: left's rows are looked up
            down, up = delta.left.T, delta.right * delta.scaling
        else:  # x @ (s * left @ right).T = (x @ right.T) @ (s * left.T)
            down, up = delta.right[:, c0:c1], (delta.left[r0:r1] * delta.scaling).T
        factors.setdefault(layer, {})[part] = (down.to(device, dtype).contiguous(), up.to(device, dtype).contiguous())
    ranks = sorted((layer, part, f[0].shape[0]) for layer, parts in factors.items() for part, f in parts.items())
    return AdapterWeights(str(path), factors, hashlib.sha256(repr(ranks).encode()).hexdigest())


def factor_dtype(model: nn.Module) -> torch.dtype:
    """The dtype adapters' factors are held and their updates computed in: the activations', but float32 for
    16-bit activations on a CPU, whose matmuls in bf16 or fp16 cost several times float32's (CPUs without
    native 16-bit arithmetic convert them; the packed base layers compute in float32 too)."""
    dtype = model.norm.weight.dtype
    if model.norm.weight.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


def _layer_of(model: nn.Module, name: str) -> Tuple[str, int]:
    """The model's layer holding checkpoint tensor `name`, and its fused part: ("layers.0.attention.wqkv", 1)
    for "layers.0.attention.wk.weight"."""
    path = name[: -len(".weight")]
    block_path, _, part = path.rpartition(".")
    block = model.get_submodule(block_path) if block_path else model
    fused = getattr(block, "fused", None)
    if fused is not None and part in block.parts():
        return f"{block_path}.{fused}", list(block.parts()).index(part)
    return path, 0


def _check_replaced(adapter: LoraAdapter, model: nn.Module, rank: int, world: int) -> None:
    """Refuse what would replace a base tensor: modules_to_save, and saved embedding or lm_head weights
    other than the base's own (PEFT saves those of an adapted embedding or lm_head beside its factors)."""
    fix = "load it merged instead (Llama.build(lora=...) or scripts/merge_lora.py)"
    saved = adapter._saved()
    if saved:
        raise CheckpointError(f"{adapter.path / CONFIG}: modules_to_save replaces {sorted(saved)[:3]} whole, which "
                              f"requests without this adapter cannot share: {fix}")
    for name in adapter.replaced:
        base = _base_weight(model, name)
        if base is None or not base.is_floating_point():
            raise CheckpointError(f"{adapter.weights}: it holds its own {name}, which cannot be checked against "
                                  f"this model's quantized or packed one: load the adapter on a float base, or "
                                  f"{fix}")
        (r0, r1), cols = region(adapter.shapes[name], 1 if name == EMBEDDING else shard_dim(name), rank, world)
        step = max(1, (4 << 20) // base.shape[1])  # rows compared at a time
        if not all(_same(adapter, name, [(lo, min(lo + step, r1)), cols], base[lo - r0 : lo - r0 + step])
                   for lo in range(r0, r1, step)):
            raise CheckpointError(f"{adapter.weights}: its {name} differs from the base model's (a resized or "
                                  f"trained embedding), which requests without this adapter cannot share: {fix}")


def _same(adapter: LoraAdapter, name: str, where, base: torch.Tensor) -> bool:
    """Whether the adapter's copy of `name` in region `where` equals the base's slice `base`, up to bf16
    rounding (PEFT saves it in the dtype it trained in)."""
    saved = torch.empty(base.shape, dtype=torch.float32)
    adapter._replace_(name, where, saved)
    reference = base.detach().float().cpu()
    return bool(((saved - reference).abs() <= 2**-8 * reference.abs() + 1e-6).all())


def _base_weight(model: nn.Module, name: str) -> Optional[torch.Tensor]:
    layer = model.get_submodule(name[: -len(".weight")])
    layer = getattr(layer, "base", layer)
    return getattr(layer, "weight", None)


class AdaptedLinear(nn.Module):
    """A linear layer (or the embedding, with `embedding`) and the low-rank updates of every adapter slot;
    see the module docstring. `parts`: this rank's output sizes of the fused parts, in order; `inputs`:
    this rank's in-features (the vocabulary for the embedding); `reduce`: the layer is row-parallel, its
    input split across ranks.

    Slot s holds `ranks[s]` rows of A and of B in every part some slot adapts (the adapter's largest
    rank in this layer: zeros pad a part it adapts with a smaller rank, or not at all). `down` is
    (parts x rows of all slots, inputs), part by part; B is kept as groups of output columns of one
    width (the parts' greatest common divisor: one kv head group for wqkv, the hidden width for w13) in
    `up` (groups, rows of all slots, width), so that one batched matmul serves every part.
    """

    def __init__(self, base: nn.Module, parts: List[int], inputs: int, device: torch.device, dtype: torch.dtype,
                 embedding: bool = False, reduce: bool = False):
        super().__init__()
        self.base = base
        self.parts, self.inputs, self.embedding, self.reduce = list(parts), inputs, embedding, reduce
        self.width = math.gcd(*self.parts)
        self.ranks: List[int] = []  # per slot
        self.adapted: List[int] = []  # the parts some slot adapts, in order
        self._allocate(device, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (its device and dtype are the layer's)."""
        return self.base.weight

    def forward(self, x: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.base(x)
        if rows is None or not self.adapted:
            return y
        # (..., S): every slot's A, in the factors' dtype (float32 on a CPU for 16-bit activations)
        h = F.embedding(x, self.down) if self.embedding else F.linear(x.to(self.down.dtype), self.down)
        if self.reduce:
            h = reduce_from_model_parallel_region(h)
        mine = rows.view(-1, *[1] * (h.dim() - 1)) == self.owner  # (B, ..., S): each row's own slot's columns
        h = h * mine
        lead, groups = h.shape[:-1], self.up.shape[0]
        if groups == 1:
            delta = h @ self.up[0]
        else:
            h = h.reshape(-1, len(self.adapted), sum(self.ranks)).index_select(1, self.group_part)  # (N, G, R)
            delta = torch.bmm(h.transpose(0, 1), self.up).transpose(0, 1).reshape(*lead, groups * self.width)
        if len(self.adapted) < len(self.parts):  # zeros for the parts no slot adapts
            pieces, at = [], 0
            for p, out in enumerate(self.parts):
                if p in self.adapted:
                    pieces.append(delta[..., at : at + out])
                    at += out
                else:
                    pieces.append(delta.new_zeros(*lead, out))
            delta = torch.cat(pieces, -1)
        return y + delta.to(y.dtype)

    def _allocate(self, device, dtype) -> None:
        """Zeroed buffers for the current slots, ranks and adapted parts."""
        R = sum(self.ranks)
        S = len(self.adapted) * R
        down = torch.zeros((self.inputs, S) if self.embedding else (S, self.inputs), device=device, dtype=dtype)
        self.register_buffer("down", down, persistent=False)
        owner = [s + 1 for _ in self.adapted for s, r in enumerate(self.ranks) for _ in range(r)]
        self.register_buffer("owner", torch.tensor(owner, dtype=torch.long, device=device), persistent=False)
        group_part = [i for i, p in enumerate(self.adapted) for _ in range(self.parts[p] // self.width)]
        self.register_buffer("group_part", torch.tensor(group_part, dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("up", torch.zeros(len(group_part), R, self.width, device=device, dtype=dtype),
                             persistent=False)

    def _rows(self, p: int, slot: int) -> Tuple[slice, slice, slice]:
        """Where slot `slot` (from 1) of adapted part `p` lies: its rows of `down` (as (S, inputs)), its
        groups of `up` and its rows in each."""
        i = self.adapted.index(p)
        at, r = sum(self.ranks[: slot - 1]), self.ranks[slot - 1]
        start = i * sum(self.ranks) + at
        first = sum(self.parts[q] // self.width for q in self.adapted[:i])
        return slice(start, start + r), slice(first, first + self.parts[p] // self.width), slice(at, at + r)

    def read(self, slot: int) -> Dict[int, Factors]:
        """What slot `slot` holds: (down (rank, inputs), up (rank, out)) per adapted part."""
        down = self.down.T if self.embedding else self.down
        out = {}
        for p in self.adapted:
            d, groups, rows = self._rows(p, slot)
            out[p] = (down[d], self.up[groups, rows].transpose(0, 1).reshape(rows.stop - rows.start, self.parts[p]))
        return out

    def reserve(self, slot: int, ranks: List[int]) -> bool:
        """Make room in slot `slot` for `ranks` rows per part, keeping what the slots hold; True if the
        buffers were reallocated (their shapes changed). A slot keeps the rows it had: a smaller adapter
        loaded into it later takes them, padded with zeros."""
        adapted = sorted(set(self.adapted) | {p for p, r in enumerate(ranks) if r > 0})
        slot_ranks = self.ranks + [0] * (slot - len(self.ranks))
        slot_ranks[slot - 1] = max(slot_ranks[slot - 1], *ranks)
        if (sum(slot_ranks), adapted) == (sum(self.ranks), self.adapted):  # at most slots with no rows here
            self.ranks = slot_ranks
            return False
        kept = {s: self.read(s) for s in range(1, len(self.ranks) + 1)}
        self.ranks, self.adapted = slot_ranks, adapted
        self._allocate(self.down.device, self.down.dtype)
        for s, factors in kept.items():
            self.write(s, factors)
        return True

    def write(self, slot: int, factors: Dict[int, Factors]) -> None:
        """Put an adapter's factors for this layer into slot `slot` (zeros where it has none)."""
        down = self.down.T if self.embedding else self.down
        for p in self.adapted:
            d, groups, rows = self._rows(p, slot)
            down[d] = 0
            self.up[groups, rows] = 0
            if p in factors and factors[p][0].shape[0]:
                a, b = factors[p]
                r = a.shape[0]
                down[d.start : d.start + r] = a
                # (r, out) -> (groups, r, width)
                self.up[groups, rows.start : rows.start + r] = b.reshape(r, -1, self.width).transpose(0, 1)


def install_(model: nn.Module) -> Dict[str, AdaptedLinear]:
    """Wrap every linear of `model` and its embedding in an AdaptedLinear with no slots (the model computes
    as before); returns them by path. Idempotent."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    if found:
        return found
    rank, world = model_parallel()
    p = model.params
    device, dtype = model.norm.weight.device, factor_dtype(model)

    def wrap(parent: nn.Module, attr: str, parts: List[int], inputs: int, **kind) -> None:
        setattr(parent, attr, AdaptedLinear(getattr(parent, attr), parts, inputs, device, dtype, **kind))

    wrap(model, "tok_embeddings", [p.dim], p.vocab_size, embedding=True)
    for block in model.layers:
        attention, ffn = block.attention, block.feed_forward
        wrap(attention, "wqkv", list(attention.parts().values()), p.dim)
        wrap(attention, "wo", [p.dim], attention.n_local_heads * attention.head_dim, reduce=world > 1)
        wrap(ffn, "w13", list(ffn.parts().values()), p.dim)
        wrap(ffn, "w2", [p.dim], ffn.hidden_local, reduce=world > 1)
    wrap(model, "output", [p.vocab_size], p.dim)
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def put_(model: nn.Module, slot: int, weights: AdapterWeights) -> bool:
    """Copy `weights` into slot `slot` (from 1) of every adapted layer of `model`, wrapping its layers on
    first use; True if any layer's buffers changed shape (a compiled forward must compile again)."""
    layers = install_(model)
    changed = False
    for path, layer in layers.items():
        factors = weights.factors.get(path, {})
        ranks = [factors[p][0].shape[0] if p in factors else 0 for p in range(len(layer.parts))]
        changed |= layer.reserve(slot, ranks)
        layer.write(slot, factors)
    return changed


# What the engine knows of adapters: names, slots, and the requests using them.

@dataclass(eq=False)
class Entry:
    """One loaded adapter: its slot in the model's layers and how many requests use it."""

    name: str
    path: str
    slot: int
    generation: int  # unique per load: a reloaded name gets another prefix-cache salt
    nbytes: int
    requests: int = 0
    retired: bool = False  # unloaded, or replaced by a newer load: its slot is freed after its last request

    @property
    def salt(self) -> bytes:
        return f"adapter {self.generation} {self.name}".encode()


@dataclass
class LoadAdapter:
    """A load for every rank to apply before a step's forwards (sent with the plan under model parallelism)."""

    id: int  # the entry's generation
    slot: int
    path: str
    signature: str


class AdapterTable:
    """Adapter names to entries, and the free slots (plain Python, used under the engine's lock)."""

    def __init__(self):
        self.by_name: Dict[str, Entry] = {}
        self.free: List[int] = []  # a heap: the lowest free slot is reused first
        self.slots = 0  # slots ever handed out
        self.generation = 0

    def names(self) -> List[str]:
        return sorted(self.by_name)

    def lookup(self, name: str) -> Entry:
        entry = self.by_name.get(name) if isinstance(name, str) else None
        if entry is None:
            loaded = ", ".join(repr(n) for n in self.names()) or "none"
            raise ValueError(f"adapter={name!r} is not loaded (loaded adapters: {loaded}): load it with "
                             "Llama.load_adapter(name, path) first")
        return entry

    def reserve(self, name: str, path: str, nbytes: int) -> Entry:
        """A slot and a generation for a load (not yet usable: `activate` once every rank has it)."""
        self.generation += 1
        if self.free:
            slot = heapq.heappop(self.free)
        else:
            self.slots += 1
            slot = self.slots
        return Entry(name, path, slot, self.generation, nbytes)

    def activate(self, entry: Entry) -> None:
        old = self.by_name.get(entry.name)
        self.by_name[entry.name] = entry
        if old is not None:
            self.retire(old)

    def discard(self, entry: Entry) -> None:
        """A reserved load that failed: its slot is free again."""
        heapq.heappush(self.free, entry.slot)

    def unload(self, name: str) -> Entry:
        entry = self.lookup(name)
        del self.by_name[name]
        self.retire(entry)
        return entry

    def retire(self, entry: Entry) -> None:
        entry.retired = True
        if entry.requests == 0:
            heapq.heappush(self.free, entry.slot)

    def acquire(self, entry: Entry) -> None:
        entry.requests += 1

    def release(self, entry: Entry) -> None:
        entry.requests -= 1
        if entry.retired and entry.requests == 0:
            heapq.heappush(self.free, entry.slot)


def check_name(name) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or not name.isprintable():
        raise ValueError(f"adapter name {name!r} must be a non-empty printable string of at most {MAX_NAME} "
                         "characters")
    return name


def check_folder(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"adapter path {path!r} must be a folder path (str or os.PathLike)")
    return str(Path(path))
