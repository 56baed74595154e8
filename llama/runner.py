"""The runner: a step's plan (llama.scheduler.Plan) executed on this rank's model.

`forward(plan)` runs the plan's two forwards, every rank alike (their collectives must match):
the decode rows, one token each (compiled, when the model is, in buckets of rows and of blocks),
and the prefill rows, a chunk each, right-padded. `execute(plan)` also turns their logits into the
plan's Output on rank 0: each sampling row's next token, drawn with the row's own settings and
generator, and the prompt statistics rows ask for. Everything comes from the plan; the runner keeps
only the generators, by sequence id, until the plan says a sequence ended.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from llama.model import Transformer
from llama.numerics import first_nonfinite
from llama.sampling import sample
from llama.scheduler import NULL_BLOCK, Output, Plan, Row

MIN_KV_BUCKET = 128  # the fewest keys a compiled decode step reads (see kv_bucket)

Logits = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


class Runner:
    def __init__(self, model: Transformer, max_batch_size: int, max_seq_len: int):
        self.model = model
        self.device = model.tok_embeddings.weight.device
        self.block_size = model.block_size
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.row_buckets = row_buckets(max_batch_size)
        self.generators: Dict[int, torch.Generator] = {}

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
        """The plan's forwards, then each sampling row's token and the prompt statistics asked for."""
        for seq_id in plan.finished:
            self.generators.pop(seq_id, None)
        output = self.sample(plan, *self.forward(plan))
        return output

    def sample(self, plan: Plan, decode_logits: Optional[torch.Tensor],
               prefill_logits: Optional[torch.Tensor]) -> Output:
        output = Output()
        sampled: List[Tuple[Row, torch.Tensor]] = []  # (row, its logits)
        offset = 0  # into prefill_logits
        for row, logits in zip(plan.decode, decode_logits if decode_logits is not None else []):
            if row.sample:
                sampled.append((row, logits))
        for row in plan.prefill:
            k = len(row.targets)
            if k:
                output.prompt_stats[row.seq_id] = _prompt_stats(prefill_logits[offset : offset + k], row.targets)
                offset += k
            if row.sample:
                sampled.append((row, prefill_logits[offset]))
                offset += 1
        if sampled:
            self._sample_rows(sampled, decode_logits, output)
        return output

    def _sample_rows(self, sampled: List[Tuple[Row, torch.Tensor]], decode_logits: Optional[torch.Tensor],
                     output: Output) -> None:
        rows = [r for r, _ in sampled]
        only_decode = decode_logits is not None and len(sampled) == len(decode_logits)
        logits = decode_logits if only_decode else torch.stack([x for _, x in sampled])  # (R, vocab)
        # Logits holding NaN or +inf, or nothing above -inf, are exactly those whose max is not finite
        # (max propagates NaN). Sampling must not see them; their rows fail.
        peak, tokens = logits.max(dim=-1)  # the max is the greedy token's logit
        params = [r.params for r in rows]
        if any(p.temperature > 0 for p in params):
            logits = logits.masked_fill(~peak.isfinite()[:, None], 0.0)
            tokens = sample(logits, [p.temperature for p in params], [p.top_p for p in params],
                            [p.top_k for p in params], [self._generator(r) for r in rows])
        # One host sync for tokens and peaks together (token ids are exact in float32).
        host_tokens, peaks = torch.stack([tokens.float(), peak.float()]).tolist()
        logprobs: List[Optional[float]] = [None] * len(rows)
        want = [i for i, p in enumerate(params) if p.logprobs]
        if want:
            index = torch.tensor(want, device=logits.device)
            chosen = F.log_softmax(logits[index], dim=-1).gather(-1, tokens[index][:, None]).squeeze(-1)
            for i, lp in zip(want, chosen.tolist()):
                logprobs[i] = lp
        for row, token, p, lp in zip(rows, host_tokens, peaks, logprobs):
            if math.isfinite(p):
                output.tokens[row.seq_id] = (int(token), lp)
            else:
                output.failed[row.seq_id] = ""

    def _generator(self, row: Row) -> Optional[torch.Generator]:
        if row.params.temperature <= 0:
            return None
        g = self.generators.get(row.seq_id)
        if g is None:
            g = self.generators[row.seq_id] = torch.Generator().manual_seed(row.seed)
        return g

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


def _prompt_stats(logits: torch.Tensor, targets: List[int]) -> Tuple[List[float], List[bool]]:
    """Log-probability and greedy flag of each target token under its row of logits."""
    target = torch.tensor(targets, device=logits.device)
    lp = F.log_softmax(logits, dim=-1).gather(-1, target[:, None]).squeeze(-1)
    greedy = logits.argmax(-1) == target
    return lp.tolist(), greedy.tolist()
