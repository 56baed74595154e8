"""Process groups and fairscale's model parallelism: device and dtype choice, the model made
model-parallel (`parallelize_`), errors agreed on by every rank (`on_every_rank`), and rank 0's
decisions sent to the other ranks each step (`StepChannel`, `follow`).

Several engines in one process (a server's several models) share one StepChannel: rank 0 runs one
engine's step at a time (`StepChannel.turn`), each message tagged with its engine's name, so the other
ranks run the same steps in the same order, and their collectives match (see `StepChannel`)."""
from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import io
import logging
import os
import pickle
import threading
from typing import Any, Callable, Iterator, List, Optional, Tuple, TypeVar, Union

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel import layers as fairscale_layers
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from torch import nn

from llama.errors import CheckpointError, LogitsError, NonFiniteError

log = logging.getLogger(__name__)
T = TypeVar("T")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def env_rank() -> int:
    """This process's global rank as torchrun announces it (0 for a plain `python` run)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """`device` as given, else cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device={device!r} is not a device: use 'cpu', 'cuda' or 'cuda:N'") from None
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda" and not device.index < torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r} is not available: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s); use 'cpu' or one of them")
        return device
    if torch.cuda.is_available():
        local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= count:  # one GPU per process: nccl refuses two ranks on one device
            raise ValueError(f"local rank {local_rank} has no GPU of its own: this host has {count} CUDA "
                             f"device(s); start at most {count} process(es) per host, or pass device='cpu'")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """`dtype` as given, else bf16 on CUDA where supported (fp16 otherwise), float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def setup_model_parallel(model_parallel_size: int, device: torch.device) -> Tuple[int, int]:
    """Join (or create) the process group and fairscale's model-parallel groups.

    Returns (model-parallel rank, model-parallel size). A plain `python` run with no
    torchrun variables gets a private one-process group, so no port is opened.
    """
    world = dist.get_world_size() if dist.is_initialized() else env_world_size()
    if world % model_parallel_size:
        raise ValueError(f"model_parallel_size={model_parallel_size} does not divide the {world} process(es) "
                         f"started: launch with torchrun --nproc_per_node {model_parallel_size} (or a multiple)")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)  # nccl binds each rank to its current device
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        # Ours to close. A group left open at exit lets gloo's and nccl's threads meet the interpreter's
        # teardown, which now and then aborts the process ("terminate called without an active exception").
        atexit.register(end_process_group)
    if not fs_init.model_parallel_is_initialized():
        # fairscale prints its group sizes on every rank; keep non-zero ranks (and stdout) quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            fs_init.initialize_model_parallel(model_parallel_size)
    mp_size = fs_init.get_model_parallel_world_size()
    if mp_size != model_parallel_size:
        raise ValueError(f"model parallelism is already set up with size {mp_size}, "
                         f"not the {model_parallel_size} requested")
    return fs_init.get_model_parallel_rank(), mp_size


def model_parallel() -> Tuple[int, int]:
    """(this process's model-parallel rank, the model-parallel size); (0, 1) before any set-up."""
    if not fs_init.model_parallel_is_initialized():
        return 0, 1
    return fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()


def end_process_group() -> None:
    """Close fairscale's groups and the process group, if set up (a later Llama.build sets them up again)."""
    global _shared
    _shared = None
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class RankError(RuntimeError):
    """Another rank failed with an error that has no counterpart here; the message says which rank."""


# Error types that may be re-created by name on the ranks that did not raise them.
_MIRRORED = {cls.__name__: cls for cls in (ValueError, TypeError, FileNotFoundError, OSError, MemoryError,
                                            CheckpointError, NonFiniteError, LogitsError)}


def on_every_rank(step: Callable[[], T], same: Any = None, what: str = "arguments") -> T:
    """Run `step` here, then agree with every other rank on whether it failed anywhere.

    A failure only one rank sees (its own shard unreadable, its own memory short, its own bad
    prompt) would leave the other ranks blocked in their next collective. One small all_gather
    instead makes every rank raise the first failing rank's error, so they all stop together with
    the same message. `same`, when given, must be equal on every rank (e.g. the prompts): ranks that
    were handed different inputs would otherwise run different collectives and hang.
    """
    error: Optional[BaseException] = None
    try:
        result = step()
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        error = e
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return result
    report = None if error is None else (type(error).__name__, str(error))
    digest = None if same is None else hashlib.sha256(pickle.dumps(same)).hexdigest()
    reports: list = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (report, digest))
    failed = [(rank, r) for rank, (r, _) in enumerate(reports) if r is not None]
    if not failed:
        differ = [rank for rank, (_, d) in enumerate(reports) if d != reports[0][1]]
        if differ:
            raise ValueError(f"rank {differ[0]} was given different {what} than rank 0: every rank must make "
                             "the same call with the same inputs")
        return result
    rank, (kind, message) = failed[0]
    if rank == dist.get_rank():
        raise error
    kind = "MemoryError" if kind == "OutOfMemoryError" else kind  # torch's (a RuntimeError) reads as one
    cls = _MIRRORED.get(kind, RankError)
    raise cls(f"rank {rank}: {message}" if cls is not RankError else f"rank {rank}: {kind}: {message}")


def smallest_on_every_rank(value: int) -> int:
    """The smallest of every rank's `value` (e.g. the KV-cache blocks each one's memory holds)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return min(values)


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes that can still be allocated on `device`: free CUDA memory, or MemAvailable on Linux CPUs."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# Model parallelism as a transform of a model built whole.

# How each linear of a block is split across model-parallel ranks: "column" splits its outputs (each
# rank computes some heads, some hidden units, some logits), "row" its inputs (each rank's partial
# outputs are summed).
PARALLEL_LINEARS = {"wqkv": "column", "w13": "column", "output": "column", "wo": "row", "w2": "row"}


@contextlib.contextmanager
def _without_fairscale_init() -> Iterator[None]:
    """Build fairscale layers without filling their weights, which the checkpoint replaces anyway.

    Above one process fairscale fills each weight by allocating the whole matrix in float32 and
    copying this rank's slice out of it, which would double the peak memory of a load. It cannot be
    pointed at the meta device either (the slice is copied into a CPU tensor), so its filler is
    switched off while a layer is built.
    """
    fill = fairscale_layers._initialize_affine_weight
    fairscale_layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fairscale_layers._initialize_affine_weight = fill


def parallelize_(model: nn.Module) -> nn.Module:
    """Make a model built whole (llama.model.Transformer, best on the meta device) this rank's part of
    a model-parallel one: its linears become fairscale's column- or row-parallel layers as
    PARALLEL_LINEARS says, its embedding a ParallelEmbedding, and its attention and feed-forward
    blocks keep this rank's heads and hidden units. Nothing changes at model-parallel size 1."""
    mp = model_parallel()[1]
    if mp == 1:
        return model
    args = model.params
    if args.n_heads % mp or args.n_kv_heads % mp:
        raise ValueError(f"n_heads={args.n_heads} and n_kv_heads={args.n_kv_heads} must both be divisible by the "
                         f"model-parallel size {mp}: run with fewer processes")
    device = model.tok_embeddings.weight.device
    keep = lambda w: w  # noqa: E731 - a checkpoint fills the weights: no random init
    with _without_fairscale_init(), torch.device(device):
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                kind = PARALLEL_LINEARS.get(name)
                if kind == "column" and isinstance(child, nn.Linear):
                    layer = ColumnParallelLinear(child.in_features, child.out_features, bias=False,
                                                 gather_output=name == "output", init_method=keep)
                elif kind == "row" and isinstance(child, nn.Linear):
                    layer = RowParallelLinear(child.in_features, child.out_features, bias=False,
                                              input_is_parallel=True, init_method=keep)
                elif isinstance(child, nn.Embedding):
                    layer = ParallelEmbedding(child.num_embeddings, child.embedding_dim, init_method=keep)
                else:
                    continue
                setattr(module, name, layer)
            if hasattr(module, "n_local_heads"):  # attention: this rank's heads
                module.n_local_heads //= mp
                module.n_local_kv_heads //= mp
            if hasattr(module, "hidden_local"):  # feed-forward: this rank's hidden units
                module.hidden_local //= mp
    return model


# Rank 0's decisions, step by step.

SHUTDOWN = "shutdown"  # sent instead of a plan: rank 0 stopped serving
LOCATE = "locate"  # sent with failed rows instead of a step's events: every rank re-runs the step (Runner.recover)
# A follower waits for rank 0's next plan while rank 0 is idle: only rank 0's exit (which breaks the
# connection at once) or its shutdown should end that wait.
_IDLE_TIMEOUT = datetime.timedelta(days=365)


class Turn:
    """A lock handed out in the order it was asked for (first come, first served): rank 0's engines take
    it around each step, so that under model parallelism two busy engines step in alternation and the other
    ranks see each one's steps whole."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._next = 0  # the ticket the next caller gets
        self._now = 0  # the ticket whose turn it is

    def acquire(self) -> None:
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            while ticket != self._now:
                self._cond.wait()

    def release(self) -> None:
        with self._cond:
            self._now += 1
            self._cond.notify_all()

    def __enter__(self) -> "Turn":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class StepChannel:
    """Rank 0's messages to the other ranks of its model-parallel group (plans, events), on a gloo group
    of their own: plain Python objects, pickled.

    One per process and model-parallel group (`shared_channel`), whatever the number of engines: every
    message is (tag, message), the tag naming the engine it is for (None for a lone engine; a server's
    model name otherwise, `Tagged`), and rank 0 sends a step's messages inside `turn`, so the other
    ranks receive each step whole and every rank runs the engines' forwards, whose collectives share
    fairscale's group, in one order: rank 0's."""

    def __init__(self):
        self.group, self.src = _control_group()
        self.turn = Turn()

    def send(self, message: Any) -> None:
        dist.broadcast_object_list([message], src=self.src, group=self.group)

    def receive(self) -> Any:
        box: List[Any] = [None]
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        return box[0]

    def agree(self, error: Optional[str]) -> Optional[str]:
        """(every rank of the group) This rank's error or None in; the first rank's error ("rank N: ...")
        out, the same on every rank, or None if no rank has one."""
        errors: List[Optional[str]] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(errors, error, group=self.group)
        return next((f"rank {rank}: {e}" for rank, e in enumerate(errors) if e is not None), None)

    def tagged(self, tag: Optional[str] = None) -> "Tagged":
        return Tagged(self, tag)


class Tagged:
    """One engine's view of the shared StepChannel: what it sends carries its tag, and what it receives must
    (a message for another engine means the ranks no longer agree on what runs)."""

    def __init__(self, channel: StepChannel, tag: Optional[str]):
        self.channel, self.tag = channel, tag

    @property
    def turn(self) -> Turn:
        return self.channel.turn

    def send(self, message: Any) -> None:
        self.channel.send((self.tag, message))

    def receive(self) -> Any:
        tag, message = self.channel.receive()
        if tag != self.tag:
            raise RuntimeError(f"rank 0 sent a step of engine {tag!r} to this rank's engine {self.tag!r}: the ranks "
                               "run different engines (every rank must build the same models in the same order)")
        return message

    def __getattr__(self, name: str) -> Any:  # the shared channel's other collectives
        return getattr(self.channel, name)


_shared: Optional[Tuple[object, StepChannel]] = None  # (fairscale's group it was made for, the channel)


def shared_channel() -> StepChannel:
    """This process's StepChannel, made on first use (a collective call: every rank makes it at the same
    point, e.g. in its first engine, or as a ModelPool starts)."""
    global _shared
    group = fs_init.get_model_parallel_group()
    if _shared is None or _shared[0] is not group:
        _shared = (group, StepChannel())
    return _shared[1]


_RECEIVE = object()  # follow's plan: receive it


def follow(channel, runner, apply: Callable[[Any], None], plan: Any = _RECEIVE) -> bool:
    """(a rank above 0) One of rank 0's steps: receive its plan (unless a dispatcher did: `plan`), run its
    forwards, hand its events to `apply`. False once rank 0 has shut the engine down."""
    if plan is _RECEIVE:
        plan = channel.receive()
    if plan == SHUTDOWN:
        return False
    runner.forward(plan)
    events = channel.receive()
    if isinstance(events, tuple) and events[0] == LOCATE:
        runner.recover(plan, events[1])
        events = channel.receive()
    apply(events)
    return True


def _control_group() -> Tuple[object, int]:
    """A gloo group of this rank's model-parallel ranks, and the global rank of its rank 0. Every rank
    creates every group (new_group is collective), in the same order."""
    mp = fs_init.get_model_parallel_world_size()
    mine = dist.get_process_group_ranks(fs_init.get_model_parallel_group())
    group = None
    for start in range(0, dist.get_world_size(), mp):
        ranks = list(range(start, start + mp))
        g = dist.new_group(ranks, backend="gloo", timeout=_IDLE_TIMEOUT)
        if ranks == mine:
            group = g
    if group is None:
        raise RuntimeError(f"model-parallel ranks {mine} are not consecutive: cannot set up the engine's group")
    return group, mine[0]
