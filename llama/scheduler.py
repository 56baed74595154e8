"""The scheduler: which sequences run in the next step, and where their keys and values live.

Plain Python, no torch and no threads: the engine calls it under its lock, once per step
(`schedule()` -> a Plan, then `update(plan, output)`), and tests drive it with plain lists.

**Blocks.** The KV cache is a pool of `num_blocks` blocks of `block_size` positions. Block 0 is the
padding block, never handed out: block tables are padded with it and padding tokens write there. A
sequence holds the blocks of its positions in order (its block table), gets more as it grows and
gives them back when it ends.

**Prefix caching.** A block full of computed tokens is keyed by a hash of its tokens and of the key
of the block before it, so a key stands for the whole prefix up to the block's end (vLLM's scheme;
the hash is SHA-256, so that one client cannot forge another's prefix). A new sequence takes the
longest run of cached blocks its tokens start with and computes only the rest. A freed block keeps
its key and contents until it is reused; free blocks are reused least recently freed first, blocks
holding nothing cached before any, so a prefix stays cached as long as memory allows.

**A step.** Running sequences first, in the order they started: a decoding sequence gets its next
token, a prefilling one its next chunk while the step's prefill budget lasts. When a sequence needs a
block and none is free, the newest running sequence is preempted: its blocks are freed and it waits
at the front of the queue, to be recomputed (from its cached blocks, mostly). Then waiting sequences
start, in order, while rows, budget and blocks last.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, FrozenSet, List, Optional, Tuple

NULL_BLOCK = 0


@dataclass
class Sequence:
    """One request as the scheduler sees it: its tokens, its blocks, how far it has been computed."""

    id: int
    tokens: List[int]  # the prompt, then each sampled token (stop tokens excluded)
    max_tokens: int  # new tokens at most
    stop_token_ids: FrozenSet[int] = frozenset()
    prompt_stats: bool = False  # wants each prompt token's log-probability: computes its whole prompt
    params: Any = None  # the request's sampling settings, handed to the runner with each row
    seed: int = 0  # its sampling generator's seed
    cache_salt: bytes = b""  # sequences share cached blocks only with the same salt (e.g. one adapter)
    adapter: int = 0  # the slot of its LoRA adapter in the model's layers, 0 for none (llama.adapters)

    prompt_len: int = 0
    computed: int = 0  # tokens whose keys and values are in the cache
    blocks: List[int] = field(default_factory=list)
    keys: List[bytes] = field(default_factory=list)  # keys of its first len(keys) blocks, all full and computed
    cached_tokens: Optional[int] = None  # prompt tokens found in the prefix cache when it first started
    stats_done: int = 0  # prompt tokens whose log-probability was reported (prompt_stats)
    finish_reason: Optional[str] = None
    preemptions: int = 0

    def __post_init__(self) -> None:
        self.prompt_len = self.prompt_len or len(self.tokens)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass
class Row:
    """One sequence's part of a forward: `tokens` at positions start, start + 1, ...; its block table
    covers them. `sample`: draw the next token from the last one's logits. `targets`: with prompt
    statistics, the prompt tokens that follow fed tokens stats_from, stats_from + 1, ... .
    `history`: on a penalized sequence's first row since it (re)started, its tokens before `start`,
    for the runner's counts."""

    seq_id: int
    start: int
    tokens: List[int]
    block_table: List[int]
    sample: bool
    params: Any = None
    seed: int = 0
    prompt_len: int = 0
    stats_from: int = 0
    targets: List[int] = field(default_factory=list)
    history: Optional[List[int]] = None
    adapter: int = 0


@dataclass
class Plan:
    """One step: a decode forward (one token per row) and a prefill forward (a chunk per row), and
    the sequences that ended since the last plan (the runner forgets their generators). `adapters`:
    LoRA adapters every rank loads into their slots before the forwards (llama.adapters.LoadAdapter)."""

    decode: List[Row] = field(default_factory=list)
    prefill: List[Row] = field(default_factory=list)
    finished: List[int] = field(default_factory=list)
    adapters: List[Any] = field(default_factory=list)

    @property
    def rows(self) -> List[Row]:
        return self.decode + self.prefill


Alternatives = Optional[List[Tuple[int, float]]]  # the most likely tokens at a position, with their log-probabilities


@dataclass
class Sampled:
    token: int
    logprob: Optional[float] = None  # when the row asked for log-probabilities
    top: Alternatives = None  # when it asked for top_logprobs


@dataclass
class PromptStats:
    """Of a row's targets: each one's log-probability and whether it was the argmax, and the alternatives."""

    logprobs: List[float]
    greedy: List[bool]
    top: Optional[List[List[Tuple[int, float]]]] = None


@dataclass
class Output:
    """What the runner made of a plan, by sequence id: sampled tokens, prompt statistics, and rows
    whose logits nothing could be sampled from (with the reason); and adapter loads that failed."""

    tokens: Dict[int, Sampled] = field(default_factory=dict)
    prompt_stats: Dict[int, PromptStats] = field(default_factory=dict)
    failed: Dict[int, str] = field(default_factory=dict)
    adapter_errors: Dict[int, str] = field(default_factory=dict)  # by LoadAdapter.id: loads that failed


@dataclass
class Event:
    """What `update` did to one sequence: the token it took (None: none, or a stop token, which ends
    it), and why it ended (None: it goes on)."""

    seq_id: int
    token: Optional[int] = None
    logprob: Optional[float] = None
    top: Alternatives = None
    stats: Optional[PromptStats] = None
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    cached_tokens: Optional[int] = None  # prompt tokens it found in the prefix cache


def block_key(parent: bytes, tokens: List[int]) -> bytes:
    """The prefix-cache key of a full block of `tokens` after the block keyed `parent`."""
    return hashlib.sha256(parent + struct.pack(f"<{len(tokens)}q", *tokens)).digest()


class BlockPool:
    """The KV cache's blocks: who holds each (a count), which hold a cached prefix (by key), which are free."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: the KV cache needs the padding block and at least one more")
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.key_of: List[Optional[bytes]] = [None] * num_blocks
        self.by_key: Dict[bytes, int] = {}
        # Free blocks, the next one to reuse first: uncached ones, then cached ones least recently freed.
        self.free: "OrderedDict[int, None]" = OrderedDict((b, None) for b in range(1, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - 1 - len(self.free)

    @property
    def num_cached(self) -> int:
        """Blocks holding a cached prefix, held or free."""
        return len(self.by_key)

    def allocate(self) -> int:
        block, _ = self.free.popitem(last=False)
        key = self.key_of[block]
        if key is not None:  # evicted: its prefix is no longer cached
            self.key_of[block] = None
            del self.by_key[key]
        self.refs[block] = 1
        return block

    def lookup(self, key: bytes) -> Optional[int]:
        return self.by_key.get(key)

    def take(self, block: int) -> None:
        """Hold a cached block (found by `lookup`)."""
        if self.refs[block] == 0:
            del self.free[block]
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free[block] = None
            if self.key_of[block] is None:  # holds nothing worth keeping: reused first
                self.free.move_to_end(block, last=False)

    def register(self, block: int, key: bytes) -> None:
        """`block` is full and computed: cache it under `key`, unless another block already holds that prefix."""
        if key not in self.by_key:
            self.by_key[key] = block
            self.key_of[block] = key

    def clear_cache(self) -> None:
        """Forget every cached prefix (blocks in use stay as they are)."""
        self.by_key.clear()
        self.key_of = [None] * self.num_blocks


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, max_batch_size: int, max_seq_len: int,
                 prefill_chunk: int, prefix_cache: bool = True):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = prefix_cache
        self.waiting: Deque[Sequence] = deque()
        self.running: List[Sequence] = []  # in the order they started
        self.sequences: Dict[int, Sequence] = {}  # waiting or running
        self._ended: List[int] = []  # since the last plan
        self.prompt_tokens_cached = 0  # prompt tokens taken from the prefix cache (first starts only)
        self.prompt_tokens_computed = 0  # prompt tokens run through the model, recomputations included
        self.preemptions = 0

    # Requests in and out.

    def capacity(self) -> int:
        """Positions the pool holds, all sequences together."""
        return (self.pool.num_blocks - 1) * self.block_size

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; a ValueError if it could never run, even alone."""
        if not seq.tokens or len(seq.tokens) >= self.max_seq_len:
            raise ValueError(f"sequence {seq.id} has {len(seq.tokens)} tokens: it needs 1 to {self.max_seq_len - 1}")
        longest = min(self.max_seq_len, len(seq.tokens) + seq.max_tokens)
        if longest > self.capacity():
            raise ValueError(f"sequence {seq.id} may grow to {longest} tokens, more than the KV cache's "
                             f"{self.capacity()}: give the cache more tokens (kv_cache_tokens)")
        self.sequences[seq.id] = seq
        self.waiting.append(seq)

    def finish(self, seq_id: int, reason: str) -> None:
        """End a waiting or running sequence (cancelled, stopped by the engine, failed): free its blocks."""
        seq = self.sequences.pop(seq_id, None)
        if seq is None:
            return
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._free(seq)
        self._ended.append(seq.id)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # A step.

    def schedule(self) -> Optional[Plan]:
        """The next step's plan, or None when nothing can run."""
        plan = Plan(finished=self._ended)
        self._ended = []
        budget = _Budget(self.prefill_chunk)
        preempted = False
        for seq in list(self.running):
            if seq not in self.running:  # preempted while this step was planned
                continue
            left = len(seq.tokens) - seq.computed
            n = 1 if left == 1 else budget.fits(left)
            if n == 0:
                continue
            if not self._grow(seq, seq.computed + n):
                preempted = True
                continue
            self._plan_row(plan, seq, n, budget)
        while self.waiting and not preempted and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if not self._start(seq, plan, budget):
                break
        if not plan.decode and not plan.prefill:
            self._ended = plan.finished + self._ended  # still to tell the runner
            return None
        return plan

    def update(self, plan: Plan, output: Output) -> List[Event]:
        """Apply a step's output: advance each row's sequence, cache its full blocks, take its sampled
        token; end it at a stop token, at its token limit or at max_seq_len."""
        events = []
        for row in plan.rows:
            seq = self.sequences.get(row.seq_id)
            if seq is None:  # ended while the step ran
                continue
            if row.seq_id in output.failed:
                events.append(Event(seq.id, finish_reason="error", error=output.failed[row.seq_id]))
                self.finish(seq.id, "error")
                continue
            seq.computed = row.start + len(row.tokens)
            self._cache_full_blocks(seq)
            event = Event(seq.id, stats=output.prompt_stats.get(seq.id), cached_tokens=seq.cached_tokens)
            if event.stats is not None:
                seq.stats_done = row.start + row.stats_from + len(row.targets)
            if row.sample:
                sampled = output.tokens[seq.id]
                token, event.logprob, event.top = sampled.token, sampled.logprob, sampled.top
                if token in seq.stop_token_ids:
                    event.finish_reason = "stop"
                else:
                    event.token = token
                    seq.tokens.append(token)
                    if seq.generated >= seq.max_tokens or len(seq.tokens) >= self.max_seq_len:
                        event.finish_reason = "length"
            elif seq.computed == len(seq.tokens) and seq.max_tokens == 0:
                event.finish_reason = "length"  # scored, nothing to generate
            if event.finish_reason is not None:
                self.finish(seq.id, event.finish_reason)
            events.append(event)
        return events

    # Planning.

    def _plan_row(self, plan: Plan, seq: Sequence, n: int, budget: "_Budget", started: bool = False) -> None:
        start = seq.computed
        tokens = seq.tokens[start : start + n]
        sample = start + n == len(seq.tokens) and seq.max_tokens > seq.generated
        row = Row(seq.id, start, tokens, list(seq.blocks), sample, seq.params, seq.seed, seq.prompt_len,
                  adapter=seq.adapter)
        if started and getattr(seq.params, "penalized", False):
            row.history = seq.tokens[:start]
        if seq.prompt_stats and start < seq.prompt_len:
            row.stats_from = max(0, seq.stats_done - start)
            row.targets = seq.tokens[start + row.stats_from + 1 : min(start + n + 1, seq.prompt_len)]
        self.prompt_tokens_computed += max(0, min(start + n, seq.prompt_len) - start)
        if n == 1 and not row.targets:  # one token in: its next one out
            plan.decode.append(row)
        else:
            budget.take(n)
            plan.prefill.append(row)

    def _start(self, seq: Sequence, plan: Plan, budget: "_Budget") -> bool:
        """Start the first waiting sequence if a row, the budget and blocks allow: take its cached
        prefix, allocate its first chunk's blocks, plan it."""
        hits = self._cached_prefix(seq)
        computed = len(hits) * self.block_size
        left = len(seq.tokens) - computed
        n = 1 if left == 1 else budget.fits(left)
        if n == 0:
            return False
        needed = -(-(computed + n) // self.block_size) - len(hits)
        free_after_hits = self.pool.num_free - sum(self.pool.refs[b] == 0 for b, _ in hits)
        if needed > free_after_hits:
            return False
        self.waiting.popleft()
        for block, key in hits:
            self.pool.take(block)
            seq.blocks.append(block)
            seq.keys.append(key)
        seq.computed = computed
        if seq.cached_tokens is None:
            seq.cached_tokens = min(computed, seq.prompt_len)
            self.prompt_tokens_cached += seq.cached_tokens
        self.running.append(seq)
        self._grow(seq, computed + n)
        self._plan_row(plan, seq, n, budget, started=True)
        return True

    def _cached_prefix(self, seq: Sequence) -> List[Tuple[int, bytes]]:
        """(block, key) of the cached blocks `seq` starts with, leaving at least its last token to compute
        (its logits give the next token); none for a sequence that wants its whole prompt's statistics."""
        if not self.prefix_cache or seq.prompt_stats:
            return []
        hits, parent = [], seq.cache_salt
        for i in range((len(seq.tokens) - 1) // self.block_size):
            key = block_key(parent, seq.tokens[i * self.block_size : (i + 1) * self.block_size])
            block = self.pool.lookup(key)
            if block is None:
                break
            hits.append((block, key))
            parent = key
        return hits

    def _grow(self, seq: Sequence, length: int) -> bool:
        """Give `seq` blocks for `length` positions, preempting the newest running sequences while none is
        free. False if `seq` itself was preempted."""
        while len(seq.blocks) * self.block_size < length:
            if self.pool.num_free == 0:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    return False
                continue
            seq.blocks.append(self.pool.allocate())
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.computed, seq.preemptions = 0, seq.preemptions + 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _free(self, seq: Sequence) -> None:
        for block in reversed(seq.blocks):  # the prefix's first blocks are the most reused: freed last
            self.pool.release(block)
        seq.blocks, seq.keys = [], []

    def _cache_full_blocks(self, seq: Sequence) -> None:
        if not self.prefix_cache:
            return
        while (len(seq.keys) + 1) * self.block_size <= seq.computed:
            i = len(seq.keys)
            parent = seq.keys[-1] if seq.keys else seq.cache_salt
            key = block_key(parent, seq.tokens[i * self.block_size : (i + 1) * self.block_size])
            self.pool.register(seq.blocks[i], key)
            seq.keys.append(key)


class _Budget:
    """A step's prefill forward is (rows, longest chunk), right-padded: at most `tokens` positions in all."""

    def __init__(self, tokens: int):
        self.tokens, self.rows, self.longest = tokens, 0, 0

    def fits(self, wanted: int) -> int:
        """How many of `wanted` tokens one more row could take: all or a chunk for the first row, and
        later ones only if the padded forward stays within the budget."""
        n = min(wanted, self.tokens)
        if self.rows and (self.rows + 1) * max(self.longest, n) > self.tokens:
            return 0
        return n

    def take(self, n: int) -> None:
        self.rows += 1
        self.longest = max(self.longest, n)
