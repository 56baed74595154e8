"""The scheduler alone, with plain lists and no model: admission, block accounting, prefix hits,
eviction, preemption, chunked prefill, and what a cancelled or failed row leaves in the cache."""
import pytest

from llama.scheduler import BlockPool, Output, PromptStats, Sampled, Scheduler, Sequence, block_key

BS = 4  # positions per block, small so that a few tokens fill several


def make(num_blocks=17, max_batch_size=4, max_seq_len=64, chunk=8, prefix_cache=True) -> Scheduler:
    return Scheduler(num_blocks, BS, max_batch_size, max_seq_len, chunk, prefix_cache)


def seq(i, tokens, max_tokens=4, **kwargs) -> Sequence:
    return Sequence(i, list(tokens), max_tokens, **kwargs)


def step(s: Scheduler, next_token=lambda row: 100 + row.seq_id, failed=()):
    """Plan a step, and answer it as a model would: each sampling row gets `next_token(row)`."""
    plan = s.schedule()
    if plan is None:
        return None, []
    out = Output()
    for row in plan.rows:
        if row.seq_id in failed:
            out.failed[row.seq_id] = "NaN"
        elif row.sample:
            out.tokens[row.seq_id] = Sampled(next_token(row))
        if row.targets:
            out.prompt_stats[row.seq_id] = PromptStats([-1.0] * len(row.targets), [True] * len(row.targets))
    return plan, s.update(plan, out)


def run_until_done(s: Scheduler, limit=200):
    events = []
    for _ in range(limit):
        if not s.has_work():
            return events
        events += step(s)[1]
    raise AssertionError("the sequences never finished")


def test_a_prompt_is_prefilled_in_chunks_then_decoded_one_token_a_step():
    s = make(chunk=8)
    s.add(seq(0, range(1, 21), max_tokens=3))  # 20 prompt tokens
    plan, _ = step(s)
    assert [(r.start, len(r.tokens), r.sample) for r in plan.prefill] == [(0, 8, False)]
    assert plan.prefill[0].block_table == s.sequences[0].blocks and len(plan.prefill[0].block_table) == 2
    plan, _ = step(s)
    assert [(r.start, len(r.tokens), r.sample) for r in plan.prefill] == [(8, 8, False)]
    plan, events = step(s)
    assert [(r.start, len(r.tokens), r.sample) for r in plan.prefill] == [(16, 4, True)]
    assert events[0].token == 100  # the first new token, from the prompt's last position
    plan, _ = step(s)
    assert not plan.prefill and [(r.start, r.tokens) for r in plan.decode] == [(20, [100])]
    assert len(plan.decode[0].block_table) == 6  # positions 0..20 need 6 blocks of 4
    plan, events = step(s)
    assert events[0].finish_reason == "length" and not s.has_work()
    assert s.pool.num_used == 0  # every block given back


def test_rows_and_the_chunk_budget_bound_a_step():
    s = make(max_batch_size=2, chunk=8)
    for i in range(3):
        s.add(seq(i, [1, 2, 3], max_tokens=2))
    plan, _ = step(s)
    # two rows at most; both 3-token prompts fit the budget together (2 x 3 <= 8)
    assert [r.seq_id for r in plan.prefill] == [0, 1] and [x.id for x in s.waiting] == [2]
    s2 = make(chunk=8)
    s2.add(seq(0, range(1, 7)))  # 6 tokens
    s2.add(seq(1, range(1, 5)))  # 4 tokens: 2 rows x 6 padded > 8, so it waits
    plan, _ = step(s2)
    assert [r.seq_id for r in plan.prefill] == [0] and [x.id for x in s2.waiting] == [1]


def test_a_request_that_could_never_fit_is_refused():
    s = make(num_blocks=5)  # 4 blocks of 4: 16 positions in all
    with pytest.raises(ValueError, match="more than the KV cache's 16"):
        s.add(seq(0, range(1, 11), max_tokens=10))
    with pytest.raises(ValueError, match="needs 1 to 63"):
        s.add(seq(1, range(1, 65)))
    s.add(seq(2, range(1, 11), max_tokens=6))  # 16 at most: fits


def test_a_repeated_prefix_is_taken_from_the_cache_and_only_the_rest_is_computed():
    s = make(chunk=16)
    prefix = list(range(1, 10))  # 9 tokens: blocks [1-4], [5-8] full
    s.add(seq(0, prefix + [50, 51], max_tokens=1))
    run_until_done(s)
    assert s.pool.num_cached == 2  # the full blocks of the prompt
    s.add(seq(1, prefix + [60], max_tokens=1))
    plan, events = step(s)
    row = plan.prefill[0]
    assert (row.start, row.tokens) == (8, [9, 60])  # 8 positions from the cache
    assert events[0].cached_tokens == 8 and s.prompt_tokens_cached == 8
    assert row.block_table[:2] == [s.pool.lookup(k) for k in _keys(prefix[:8])]


def _keys(tokens, salt=b""):
    keys, parent = [], salt
    for i in range(0, len(tokens) - len(tokens) % BS, BS):
        parent = block_key(parent, tokens[i : i + BS])
        keys.append(parent)
    return keys


def test_a_fully_cached_prompt_still_computes_its_last_token():
    s = make()
    s.add(seq(0, range(1, 9), max_tokens=1))  # two full blocks
    run_until_done(s)
    s.add(seq(1, range(1, 9), max_tokens=2))
    plan, events = step(s)
    # the second block is not taken: its last token must be run for the next token's logits
    assert [(r.start, r.tokens) for r in plan.prefill] == [(4, [5, 6, 7, 8])]
    assert events[0].cached_tokens == 4


def test_prefixes_differ_by_salt_and_by_any_earlier_token():
    s = make(chunk=32)
    s.add(seq(0, range(1, 10), max_tokens=1))
    run_until_done(s)
    s.add(seq(1, range(1, 10), max_tokens=1, cache_salt=b"adapter-a"))
    s.add(seq(2, [99] + list(range(2, 10)), max_tokens=1))  # the second block's tokens match, not the first's
    plan, events = step(s)
    assert all(r.start == 0 for r in plan.prefill)
    assert [e.cached_tokens for e in events] == [0, 0]


def test_scoring_sequences_compute_their_whole_prompt_and_get_every_target():
    s = make(chunk=8)
    s.add(seq(0, range(1, 13), max_tokens=1))
    run_until_done(s)
    s.add(seq(1, range(1, 13), max_tokens=0, prompt_stats=True))
    plan, events = step(s)
    assert plan.prefill[0].start == 0 and plan.prefill[0].targets == list(range(2, 10))
    plan, events = step(s)
    assert plan.prefill[0].start == 8 and plan.prefill[0].targets == [10, 11, 12]
    assert events[0].finish_reason == "length" and not s.has_work()


def test_freed_cached_blocks_are_evicted_least_recently_freed_first():
    pool = BlockPool(5)  # blocks 1..4
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    pool.register(a, b"A")
    pool.register(b, b"B")
    for block in (b, a, c):  # b freed first, then a; c caches nothing
        pool.release(block)
    assert pool.num_free == 4 and pool.num_cached == 2
    assert pool.allocate() == c  # holds nothing: reused before any cached block
    assert pool.allocate() == 4  # never used
    assert pool.allocate() == b and pool.lookup(b"B") is None  # the least recently freed cached block
    assert pool.lookup(b"A") == a
    pool.take(a)  # a hit: held again, no longer free
    assert pool.num_free == 0 and pool.refs[a] == 1


def test_when_blocks_run_out_the_newest_sequence_is_preempted_and_recomputed():
    s = make(num_blocks=7, chunk=16, max_seq_len=32)  # 6 blocks of 4: 24 positions
    s.add(seq(0, range(1, 9), max_tokens=8))  # up to 16 positions: 4 blocks
    s.add(seq(1, range(20, 28), max_tokens=8))
    generated = {0: [], 1: []}
    preempted_at = None
    for n in range(40):  # both prefilled at once (2 + 2 blocks), then each grows a block every 4 tokens
        plan, events = step(s, next_token=lambda row: 200 + row.start)
        for e in events:
            if e.token is not None:
                generated[e.seq_id].append(e.token)
        if s.preemptions and preempted_at is None:
            preempted_at = n
            assert [x.id for x in s.waiting] == [1] and s.sequences[1].computed == 0  # the newer one
            assert s.pool.num_used == len(s.sequences[0].blocks)
        if not s.has_work():
            break
    assert preempted_at is not None and not s.has_work()
    assert len(generated[0]) == 8 and len(generated[1]) == 8  # both finished in full
    assert s.pool.num_used == 0


def test_a_recomputed_sequence_takes_back_its_own_cached_blocks():
    s = make(num_blocks=7, chunk=16, max_seq_len=32)
    s.add(seq(0, range(1, 9), max_tokens=8))
    s.add(seq(1, range(20, 28), max_tokens=8))
    while not s.preemptions:
        step(s)
    victim = s.waiting[0]
    while victim.id in s.sequences and victim.computed == 0:
        plan, _ = step(s)
    assert victim.preemptions == 1
    # restarted from its cached full blocks, not from position 0
    assert victim.computed > 4


def test_a_cancelled_sequence_frees_its_blocks_and_caches_nothing_uncomputed():
    s = make(chunk=8)
    s.add(seq(0, range(1, 30), max_tokens=2))
    step(s)  # 8 of 29 tokens computed: 2 full blocks cached
    plan = s.schedule()  # the next chunk is planned (blocks allocated) but never run
    assert len(s.sequences[0].blocks) == 4
    s.finish(0, "cancelled")
    assert s.pool.num_used == 0 and s.pool.num_cached == 2
    assert s.update(plan, Output()) == []  # its step's output comes too late: ignored
    assert s.pool.num_cached == 2


def test_a_failed_row_caches_nothing_of_its_step():
    s = make(chunk=8)
    s.add(seq(0, range(1, 9), max_tokens=2))
    plan, events = step(s, failed={0})
    assert events[0].finish_reason == "error" and events[0].error == "NaN"
    assert s.pool.num_cached == 0 and s.pool.num_used == 0
    assert s.schedule() is None  # nothing runs; the runner still hears of the end with the next plan


def test_stop_tokens_and_max_seq_len_end_a_sequence():
    s = make(max_seq_len=12)
    s.add(seq(0, [1, 2, 3], max_tokens=50, stop_token_ids=frozenset({7})))
    s.add(seq(1, [1, 2, 3], max_tokens=50))
    events = []
    tokens = {0: iter([5, 6, 7, 8]), 1: iter(range(10, 30))}
    while s.has_work():
        events += step(s, next_token=lambda row: next(tokens[row.seq_id]))[1]
    ends = {e.seq_id: e.finish_reason for e in events if e.finish_reason}
    assert ends == {0: "stop", 1: "length"}
    took = {i: [e.token for e in events if e.seq_id == i and e.token is not None] for i in (0, 1)}
    assert took[0] == [5, 6]  # the stop token is not taken
    assert len(took[1]) == 12 - 3  # until max_seq_len


def test_without_prefix_caching_nothing_is_cached():
    s = make(prefix_cache=False)
    s.add(seq(0, range(1, 10), max_tokens=1))
    run_until_done(s)
    s.add(seq(1, range(1, 10), max_tokens=1))
    plan, events = step(s)
    assert plan.prefill[0].start == 0 and s.pool.num_cached == 0
