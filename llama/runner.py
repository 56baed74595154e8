"""The runner: a step's plan (llama.scheduler.Plan) executed on this rank's model.

`forward(plan)` runs the plan's two forwards, every rank alike (their collectives must match):
the decode rows, one token each (compiled, when the model is, in buckets of rows and of blocks),
and the prefill rows, a chunk each, right-padded. `execute(plan)` also turns their logits into the
plan's Output on rank 0: each sampling row's next token, drawn with the row's own settings
(penalties, logit bias, a grammar's mask, temperature, top-k, top-p, min-p: llama.sampling) and
generator, and the log-probabilities rows ask for. Everything comes from the plan; the runner keeps
only what a sequence's sampling carries from step to step (its generator, its token counts for
penalties, its grammar's parser state), by sequence id, until the plan says the sequence ended.
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from llama.grammar import Grammars
from llama.model import Transformer
from llama.numerics import first_nonfinite
from llama.sampling import penalize, sample, top_logprobs
from llama.scheduler import NULL_BLOCK, Output, Plan, PromptStats, Row, Sampled

MIN_KV_BUCKET = 128  # the fewest keys a compiled decode step reads (see kv_bucket)

Logits = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


@dataclass
class _State:
    """What the runner keeps of a sequence between steps."""

    generator: Optional[torch.Generator] = None
    seen: Optional[torch.Tensor] = None  # (V,) bool: the tokens of its prompt and output (repetition penalty)
    counts: Optional[torch.Tensor] = None  # (V,) float: how often each token is in its output
    matcher: Any = None  # its grammar's parser state


class Runner:
    def __init__(self, model: Transformer, max_batch_size: int, max_seq_len: int,
                 grammars: Optional[Grammars] = None):
        self.model = model
        self.device = model.tok_embeddings.weight.device
        self.block_size = model.block_size
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.row_buckets = row_buckets(max_batch_size)
        self.grammars = grammars
        self.states: Dict[int, _State] = {}
        self._grammar_thread: Optional[ThreadPoolExecutor] = None  # computes masks beside the forwards

    # Every rank.

    @torch.inference_mode()
    def forward(self, plan: Plan) -> Logits:
        """Decode logits (decode rows, vocab) and prefill logits (the positions rows want, in row order:
        each prompt-statistics position, then the last position of a sampling row)."""
        decode_logits = prefill_logits = None
        if plan.decode:
            decode_logits = self._decode(plan.decode)
        if plan.prefill:
            prefill_logits = self._prefill(plan.prefill)
        return decode_logits, prefill_logits

    def _decode(self, rows: List[Row]) -> torch.Tensor:
        B = len(rows)
        positions = [r.start for r in rows]
        width = max(len(r.block_table) for r in rows)
        forward = self.model
        if self.model.compiled is not None:
            # A compiled step has a fixed number of rows and of blocks per bucket: pad rows read and
            # write only the padding block.
            forward = self.model.compiled
            B = next(b for b in self.row_buckets if b >= B)
            width = -(-kv_bucket(max(positions) + 1, self.max_seq_len) // self.block_size)
        tables = [_padded(r.block_table, width) for r in rows] + [[NULL_BLOCK] * width] * (B - len(rows))
        inputs = [[r.tokens[0] for r in rows], positions, [self._slot(r, 0) for r in rows]]
        return self._run_decode(forward, [row + [0] * (B - len(rows)) for row in inputs], tables)[: len(rows), 0]

    def _run_decode(self, forward, inputs: List[List[int]], tables: List[List[int]]) -> torch.Tensor:
        """Tokens, positions and slots (3, B), as views of one copy to the device, and block tables (B, W)."""
        grid = self._tensor(inputs)
        B = grid.shape[1]
        return forward(grid[0].view(B, 1), grid[1].view(B, 1), grid[2].view(B, 1), self._tensor(tables))

    def _prefill(self, rows: List[Row]) -> Optional[torch.Tensor]:
        T = max(len(r.tokens) for r in rows)
        width = max(len(r.block_table) for r in rows)
        tokens, positions, slots, select = [], [], [], []
        for i, r in enumerate(rows):
            n, pad = len(r.tokens), T - len(r.tokens)
            tokens.append(r.tokens + [0] * pad)
            # Padding tokens sit at the row's last position (any valid one would do) and write to the
            # padding block: their outputs are dropped.
            positions.append([r.start + j for j in range(n)] + [r.start + n - 1] * pad)
            slots.append([self._slot(r, j) for j in range(n)] + [0] * pad)
            select += [(i, r.stats_from + j) for j in range(len(r.targets))]
            if r.sample:
                select.append((i, n - 1))
        tables = [_padded(r.block_table, width) for r in rows]
        grid = self._tensor([tokens, positions, slots])  # (3, R, T)
        h = self.model.hidden(grid[0], grid[1], grid[2], self._tensor(tables))
        if not select:
            return None
        index = self._tensor(select)  # (N, 2): (row, column)
        return self.model.logits(h[index[:, 0], index[:, 1]])

    def _slot(self, row: Row, j: int) -> int:
        """The cache slot of the row's j-th token."""
        position = row.start + j
        return row.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    # Rank 0.

    def execute(self, plan: Plan) -> Output:
        """The plan's forwards, then each sampling row's token and the prompt statistics asked for. The
        constrained rows' masks are computed in a thread of their own while the forwards run."""
        for seq_id in plan.finished:
            self.states.pop(seq_id, None)
        for row in plan.rows:
            if row.params.penalized:
                self._count(row)
        masks = self._start_masks(plan)
        return self.sample(plan, *self.forward(plan), masks=masks)

    def _start_masks(self, plan: Plan) -> Optional[Future]:
        rows = [r for r in plan.rows if r.sample and r.params.constraint is not None]
        if not rows:
            return None
        if self._grammar_thread is None:
            self._grammar_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-grammar")
        matchers = [self._matcher(r) for r in rows]
        return self._grammar_thread.submit(lambda: ([r.seq_id for r in rows], *self.grammars.fill(matchers)))

    def sample(self, plan: Plan, decode_logits: Optional[torch.Tensor],
               prefill_logits: Optional[torch.Tensor], masks: Optional[Future] = None) -> Output:
        output = Output()
        sampled: List[Tuple[Row, torch.Tensor]] = []  # (row, its logits)
        offset = 0  # into prefill_logits
        for row, logits in zip(plan.decode, decode_logits if decode_logits is not None else []):
            if row.sample:
                sampled.append((row, logits))
        for row in plan.prefill:
            k = len(row.targets)
            if k:
                output.prompt_stats[row.seq_id] = _prompt_stats(prefill_logits[offset : offset + k], row.targets,
                                                                row.params.top_logprobs)
                offset += k
            if row.sample:
                sampled.append((row, prefill_logits[offset]))
                offset += 1
        if sampled:
            self._sample_rows(sampled, decode_logits, output, masks)
        return output

    def _sample_rows(self, sampled: List[Tuple[Row, torch.Tensor]], decode_logits: Optional[torch.Tensor],
                     output: Output, masks: Optional[Future]) -> None:
        rows = [r for r, _ in sampled]
        params = [r.params for r in rows]
        only_decode = decode_logits is not None and len(sampled) == len(decode_logits)
        logits = decode_logits if only_decode else torch.stack([x for _, x in sampled])  # (R, vocab)
        # Logits holding NaN or +inf, or nothing above -inf, are exactly those whose max is not finite
        # (max propagates NaN). Sampling must not see them; their rows fail.
        peak = logits.amax(dim=-1)
        work = self._processed(logits, rows, output, masks)
        if any(p.temperature > 0 for p in params):
            work = work.masked_fill(~peak.isfinite()[:, None], 0.0)
        tokens = sample(work, [p.temperature for p in params], [p.top_p for p in params], [p.top_k for p in params],
                        [p.min_p for p in params], [self._generator(r) for r in rows])
        # One host sync for tokens and peaks together (token ids are exact in float32).
        host_tokens, peaks = torch.stack([tokens.float(), peak.float()]).tolist()
        logprobs, tops = self._logprobs(logits, tokens, params)
        for i, (row, token, p) in enumerate(zip(rows, host_tokens, peaks)):
            if row.seq_id in output.failed:
                continue
            if not math.isfinite(p):
                output.failed[row.seq_id] = ""
                continue
            output.tokens[row.seq_id] = Sampled(int(token), logprobs[i], tops[i])
            matcher = self.states[row.seq_id].matcher if row.params.constraint is not None else None
            if matcher is not None and not matcher.consume_token(int(token)):
                output.failed[row.seq_id] = f"the constraint refused token {int(token)}: {matcher.get_error()}"

    def _processed(self, logits: torch.Tensor, rows: List[Row], output: Output,
                   masks: Optional[Future]) -> torch.Tensor:
        """The logits sampling draws from: after each row's penalties, logit bias and grammar mask (a copy,
        where any applies; the model's own logits stay for the log-probabilities)."""
        penalized = [i for i, r in enumerate(rows) if r.params.penalized]
        biased = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias]
        constrained = [i for i, r in enumerate(rows) if r.params.constraint is not None]
        if not (penalized or biased or constrained):
            return logits
        work = logits.clone()
        if penalized:
            index = torch.tensor(penalized, device=work.device)
            states = [self.states[rows[i].seq_id] for i in penalized]
            ps = [rows[i].params for i in penalized]
            values = lambda name: torch.tensor([getattr(p, name) for p in ps], device=work.device)  # noqa: E731
            work[index] = penalize(work[index], torch.stack([s.seen for s in states]),
                                   torch.stack([s.counts for s in states]), values("repetition_penalty"),
                                   values("frequency_penalty"), values("presence_penalty"))
        if biased:
            i, t, b = zip(*biased)
            work.index_put_((torch.tensor(i, device=work.device), torch.tensor(t, device=work.device)),
                            torch.tensor(b, device=work.device, dtype=work.dtype), accumulate=True)
        if constrained:
            seq_ids, bitmask, error = masks.result()
            at = {seq_id: k for k, seq_id in enumerate(seq_ids)}
            self.grammars.apply(work, constrained, bitmask[[at[rows[i].seq_id] for i in constrained]])
            if error is not None:
                for i in constrained:
                    output.failed[rows[i].seq_id] = f"the constraint cannot go on: {error}"
        return work

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, params) -> Tuple[list, list]:
        """Per row: the sampled token's log-probability and its top alternatives, under the model's own
        distribution, where asked for (else None)."""
        logprobs: List[Optional[float]] = [None] * len(params)
        tops: List[Optional[list]] = [None] * len(params)
        want = [i for i, p in enumerate(params) if p.logprobs]
        if not want:
            return logprobs, tops
        index = torch.tensor(want, device=logits.device)
        distribution = F.log_softmax(logits[index], dim=-1)
        for i, lp in zip(want, distribution.gather(-1, tokens[index][:, None]).squeeze(-1).tolist()):
            logprobs[i] = lp
        k = max(params[i].top_logprobs for i in want)
        if k:
            ids, values = top_logprobs(distribution, k)
            for row, i in enumerate(want):
                n = params[i].top_logprobs
                tops[i] = list(zip(ids[row][:n], values[row][:n])) if n else None
        return logprobs, tops

    def _state(self, seq_id: int) -> _State:
        state = self.states.get(seq_id)
        if state is None:
            state = self.states[seq_id] = _State()
        return state

    def _generator(self, row: Row) -> Optional[torch.Generator]:
        if row.params.temperature <= 0:
            return None
        state = self._state(row.seq_id)
        if state.generator is None:
            state.generator = torch.Generator().manual_seed(row.seed)
        return state.generator

    def _matcher(self, row: Row):
        state = self._state(row.seq_id)
        if state.matcher is None:
            state.matcher = self.grammars.matcher(row.params.constraint)
        return state.matcher

    def _count(self, row: Row) -> None:
        """Add a penalized row's fed tokens to its sequence's counts (first, on a (re)start, its history)."""
        state = self._state(row.seq_id)
        V = self.model.vocab_size
        if row.history is not None or state.seen is None:
            state.seen = torch.zeros(V, dtype=torch.bool, device=self.device)
            state.counts = torch.zeros(V, device=self.device)
            self._add(state, row.history or [], 0, row.prompt_len)
        self._add(state, row.tokens, row.start, row.prompt_len)

    def _add(self, state: _State, tokens: List[int], start: int, prompt_len: int) -> None:
        if not tokens:
            return
        ids = self._tensor(tokens)
        state.seen[ids] = True
        output = ids[max(0, prompt_len - start) :]  # the positions past the prompt
        if output.numel():
            state.counts.index_add_(0, output, torch.ones(output.numel(), device=self.device))

    def recover(self, plan: Plan, failed: List[int]) -> str:
        """(every rank alike) After rows of `plan` turned non-finite: name the first module whose output did
        (re-running the forwards writes the same values again), then zero what those rows wrote, and the
        padding block. Attention weighs a masked position by 0, but 0 x NaN is NaN: stale NaN in a block
        handed to another sequence later, or in the padding block, would poison it."""
        where = first_nonfinite(self.model, lambda: self.forward(plan)) or "none in a module"
        blocks = {NULL_BLOCK}
        for row in plan.rows:
            if row.seq_id in failed:
                last = row.start + len(row.tokens) - 1
                blocks.update(row.block_table[row.start // self.block_size : last // self.block_size + 1])
        index = self._tensor(sorted(blocks))
        with torch.inference_mode():
            for layer in self.model.layers:
                layer.attention.cache.index_fill_(0, index, 0)
        return where

    def compile_all(self) -> int:
        """(every rank alike, no sequence running) Run the compiled decode step once for every bucket of
        rows and of blocks, on padding rows; returns how many."""
        if self.model.compiled is None:
            return 0
        widths = sorted({-(-kv_bucket(n, self.max_seq_len) // self.block_size) for n in range(1, self.max_seq_len + 1)})
        for width in widths:
            for rows in self.row_buckets:
                with torch.inference_mode():  # inputs made as a step makes them, so that it finds the same graph
                    self._run_decode(self.model.compiled, [[0] * rows] * 3, [[NULL_BLOCK] * width] * rows)
        return len(widths) * len(self.row_buckets)


def kv_bucket(n: int, max_seq_len: int) -> int:
    """The keys a compiled decode step reads when the furthest row needs n: a power of two, at least
    MIN_KV_BUCKET, at most max_seq_len. Reading every position instead
    would cost a step as much attention at its first token as at its last."""
    return min(max_seq_len, max(MIN_KV_BUCKET, 1 << (n - 1).bit_length()))


def row_buckets(max_batch_size: int) -> List[int]:
    """Row counts a compiled decode step is compiled for: powers of two, and max_batch_size."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return sizes + [max_batch_size]


def _padded(table: List[int], width: int) -> List[int]:
    return table[:width] + [NULL_BLOCK] * (width - len(table))


def _prompt_stats(logits: torch.Tensor, targets: List[int], k: int) -> PromptStats:
    """Log-probability and greedy flag of each target token under its row of logits, and with k > 0 the
    k most likely tokens there."""
    target = torch.tensor(targets, device=logits.device)
    distribution = F.log_softmax(logits, dim=-1)
    lp = distribution.gather(-1, target[:, None]).squeeze(-1)
    greedy = logits.argmax(-1) == target
    top = [list(zip(*pair)) for pair in zip(*top_logprobs(distribution, k))] if k else None
    return PromptStats(lp.tolist(), greedy.tolist(), top)
