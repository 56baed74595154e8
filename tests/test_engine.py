"""The engine: many calls from many threads on one Llama, each answered as if it ran alone; slots freed by
dropped streams; long prompts prefilled in chunks while others decode; bad calls fail alone."""
import gc
import json
import threading

import pytest
import torch

import engine_workload
from conftest import script, torchrun
from llama import Llama

CHUNK = 16


@pytest.fixture(scope="module")
def g(tiny_ckpt) -> Llama:
    """4 slots for 12 concurrent calls: most of them wait for a slot."""
    return Llama.build(str(tiny_ckpt), max_seq_len=96, max_batch_size=4, device="cpu", prefill_chunk=CHUNK)


@pytest.fixture(scope="module")
def solo_run(g):
    """Each call of the workload made alone, and the engine steps that took."""
    before = g.engine.stats.steps
    return engine_workload.alone(g), g.engine.stats.steps - before


@pytest.fixture(scope="module")
def solo(solo_run):
    return solo_run[0]


def test_calls_from_threads_with_staggered_starts_equal_each_call_alone(g, solo_run):
    solo, solo_steps = solo_run
    before = g.engine.stats.steps
    together = engine_workload.together(g)
    engine_workload.assert_same(together, solo)
    assert g.engine.pending() == (0, 0)  # every slot freed, nothing left waiting
    # They really ran together: far fewer steps than the calls made one after another.
    assert g.engine.stats.steps - before < 0.6 * solo_steps


def test_a_seeded_call_repeats_and_another_seed_differs(g):
    kwargs = dict(temperature=1.0, top_p=0.95, max_gen_len=20)
    first = g.text_completion(["The cat", "A dog"], seed=7, **kwargs)
    assert g.text_completion(["The cat", "A dog"], seed=7, **kwargs) == first
    assert g.text_completion(["The cat", "A dog"], seed=8, **kwargs) != first
    # prompt i samples from seed + i, whatever it shares a call with
    assert g.text_completion(["A dog"], seed=8, **kwargs)[0] == first[1]


def test_a_dropped_stream_frees_its_slot(tiny_ckpt):
    g = Llama.build(str(tiny_ckpt), max_seq_len=64, max_batch_size=2, device="cpu")
    kept = g.stream(["The cat"], temperature=0, max_gen_len=40)
    dropped = g.stream(["A dog"], temperature=0, max_gen_len=40)
    next(kept), next(dropped)
    assert g.engine.pending() == (0, 2)  # both slots taken
    del dropped
    gc.collect()
    third = []
    t = threading.Thread(target=lambda: third.append(g.text_completion(["One two"], temperature=0, max_gen_len=8)))
    t.start()
    t.join(timeout=30)  # would wait forever for a slot the dropped stream still held
    assert third == [g.text_completion(["One two"], temperature=0, max_gen_len=8)]
    kept.close()
    g.generate([[1]], max_gen_len=1, temperature=0)  # a step, which frees the closed stream's slot
    assert g.engine.pending() == (0, 0)


def test_a_long_prompt_is_prefilled_a_chunk_per_step_while_others_decode(g, tiny_ckpt, monkeypatch):
    steps = []
    run = g.engine.runner.forward

    def recording(plan):
        padded = len(plan.prefill) * max((len(r.tokens) for r in plan.prefill), default=0)
        steps.append((len(plan.decode), padded))
        return run(plan)

    monkeypatch.setattr(g.engine.runner, "forward", recording)
    long_text = " ".join(["the happy dog ran to the park"] * 8)
    assert len(g.tokenizer.encode(long_text, bos=True, eos=False)) > 4 * CHUNK
    # alone on a model of its own: run here first, the prompt would be in g's prefix cache
    alone = Llama.build(str(tiny_ckpt), max_seq_len=96, max_batch_size=4, device="cpu").text_completion(
        [long_text], temperature=0, max_gen_len=4)
    streams = g.stream(["The cat", "A big", "Once"], temperature=0, max_gen_len=60)
    texts = [""] * 3
    while not all(r.tokens for r in streams.requests):  # until all three decode
        texts = [a + b for a, b in zip(texts, next(streams))]
    steps.clear()
    answer = []
    t = threading.Thread(target=lambda: answer.append(g.text_completion([long_text], temperature=0, max_gen_len=4)))
    t.start()
    for pieces in streams:  # this thread drives; the long prompt joins its steps
        texts = [a + b for a, b in zip(texts, pieces)]
        if len(steps) > 12:
            break
    t.join(timeout=30)
    streams.close()
    assert answer == [alone]
    prefill_steps = [(rows, tokens) for rows, tokens in steps if tokens]
    assert len(prefill_steps) >= 4  # the long prompt took several steps...
    assert all(tokens <= CHUNK for _, tokens in prefill_steps)  # ...of at most one chunk each...
    assert all(rows == 3 for rows, _ in prefill_steps), steps  # ...and none of them held the streams back


def test_a_bad_call_fails_in_its_own_thread_only(g, solo):
    calls = engine_workload.calls(g)
    results, errors = {}, {}

    def good(i):
        results[i] = calls[i]()

    def bad(name, call):
        try:
            call()
        except ValueError as e:
            errors[name] = str(e)

    threads = [threading.Thread(target=good, args=(i,)) for i in range(0, len(calls), 2)]
    threads += [threading.Thread(target=bad, args=("temperature", lambda: g.generate([[1, 5]], 8, temperature=-1))),
                threading.Thread(target=bad, args=("too long", lambda: g.generate([[1] * 96], 8))),
                threading.Thread(target=bad, args=("too many", lambda: g.text_completion(["a"] * 5)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i, r in results.items():
        engine_workload.assert_same(r, solo[i], f"call {i}")
    assert "temperature=-1" in errors["temperature"]
    assert "prompt 0 has 96 tokens, which leaves no room" in errors["too long"]
    assert "5 prompts exceed max_batch_size=4" in errors["too many"]


def test_a_row_whose_logits_turn_nan_fails_its_call_and_no_other(g):
    """Token 499 turns its row's embedding into NaN: the call holding it fails, naming the module; a
    stream sharing its steps goes on to its solo text."""
    alone = g.text_completion(["The cat sat"], temperature=0, max_gen_len=30)[0]["generation"]

    def poison(module, inputs, output):
        return output.masked_fill((inputs[0] == 499)[..., None], float("nan"))

    handle = g.model.tok_embeddings.register_forward_hook(poison)
    try:
        stream = g.stream(["The cat sat"], temperature=0, max_gen_len=30)
        text = "".join(next(stream))
        errors = []

        def bad():
            try:
                g.generate([[1, 5, 499, 7]], max_gen_len=8, temperature=0)
            except ValueError as e:
                errors.append(e)

        t = threading.Thread(target=bad)
        t.start()
        text += "".join(p[0] for p in stream)
        t.join(timeout=30)
    finally:
        handle.remove()
    assert text == alone
    assert "row 0 at generation step 0: the model's logits are NaN" in str(errors[0])
    assert "First non-finite output: tok_embeddings (Embedding, torch.float32" in str(errors[0])


def test_requests_from_threads_equal_transformers_continuous_batching(tiny_ckpt, g):
    """The same greedy requests through transformers' own continuous batching (generate_batch) on the same
    float32 weights give the same tokens."""
    benchmark = script("benchmark")  # its HF model and runners
    hf = benchmark.hf_model(str(tiny_ckpt), torch.float32, torch.device("cpu"))
    prompts = benchmark.mixed_prompts(5, 10, g.model.vocab_size)
    ours = benchmark._threads(g, prompts, 8)
    assert ours == benchmark._hf_batch(hf, prompts, 8, g.tokenizer.eos_id)
    assert len({len(p) for p in prompts}) > 3 and sum(map(len, ours)) > 20


@pytest.mark.slow
def test_two_processes_serving_threads_equal_one_process(tiny_ckpt2, g, solo, tmp_path):
    """Rank 0 takes the calls from its threads while rank 1 follows its steps (serve_forever)."""
    proc = torchrun(2, "tests/engine_worker.py", str(tiny_ckpt2), str(tmp_path / "out.json"), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out.json").read_text())
    engine_workload.assert_same(report["together"], report["alone"], "2 processes, threads vs alone")
    # Greedy calls (kinds 0, 2, 3) and scores give what one process gives; sampled ones may differ in
    # the last bits of their logits, so only alone vs together is compared for them.
    for i in range(engine_workload.N_CALLS):
        if i % 6 in (0, 2, 3, 5):
            engine_workload.assert_same(_jsonable(solo[i]), report["alone"][i], f"call {i}, 1 vs 2 processes")
    # rank 0 decided the block tables and the prefix hits; every rank ran them
    uncached = Llama.build(str(tiny_ckpt2), max_seq_len=96, max_batch_size=4, device="cpu", prefix_cache=False)
    _assert_conversation(report["conversation"], engine_workload.conversation(uncached))


def _assert_conversation(cached, uncached):
    for turn, ((tokens, lps, hit), (expected, expected_lps, none)) in enumerate(zip(cached, uncached)):
        assert tokens == expected, f"turn {turn}"
        assert lps == pytest.approx(expected_lps, abs=1e-5), f"turn {turn}"
        assert none == 0
        assert hit >= (16 if turn else 0), f"turn {turn}: {hit} cached prompt tokens"


def test_a_conversation_from_the_prefix_cache_equals_one_without_it(g, tiny_ckpt):
    """Each turn's prompt repeats the last one: taken from the cache, its tokens and log-probabilities are
    those of a model without a prefix cache."""
    uncached = Llama.build(str(tiny_ckpt), max_seq_len=96, max_batch_size=4, device="cpu", prefix_cache=False)
    cached = engine_workload.conversation(g)
    _assert_conversation(cached, engine_workload.conversation(uncached))
    assert cached[-1][2] >= 48  # by the last turn, most of its 60-odd prompt tokens


def test_requests_beyond_the_kv_cache_are_preempted_and_still_give_their_solo_answers(tiny_ckpt, solo):
    """A cache of one sequence's worth (96 positions) for 4 rows: the rows outgrow it, the newest are
    preempted and recomputed, and every call still gets what it gets alone."""
    small = Llama.build(str(tiny_ckpt), max_seq_len=96, max_batch_size=4, device="cpu", prefill_chunk=CHUNK,
                        kv_cache_tokens=96)
    assert small.engine.kv_cache_tokens == 96
    together = engine_workload.together(small)
    engine_workload.assert_same(together, solo)
    assert small.engine.stats.preemptions > 0
    assert small.engine.pending() == (0, 0) and small.engine.stats.kv_blocks_used == 0


def _jsonable(x):
    return json.loads(json.dumps(x))


def test_submit_calls_on_change_from_the_engine_and_poll_reads_without_waiting(g):
    """What a server's event loop uses instead of a thread per request (llama.serve.watch)."""
    prompt = g.tokenizer.encode("The cat", bos=True, eos=False)
    expected = g.text_completion(["The cat"], temperature=0, max_gen_len=12)[0]["generation"]
    calls, seen = [], []
    c = g.submit(prompt, 12, temperature=0, on_change=lambda: calls.append(threading.get_ident()))
    c.wait()
    while (delta := c.poll()) is not None:
        seen.append(delta)
    assert "".join(d.text for d in seen) == c.text == expected
    assert sum(len(d.tokens) for d in seen) == len(c.tokens) == 12
    assert len(calls) >= 12 and threading.get_ident() not in calls  # once a step at least, from the driver


def test_a_vocabulary_padded_beyond_the_tokenizer_generates_ids_without_text(tiny_ckpt, tmp_path):
    """Checkpoints pad vocab_size past the tokenizer's pieces (to a multiple of 64, reserved rows). A sampled id
    among the padding has no text: the completion goes on, its text skips it, and the engine keeps serving."""
    from llama.checkpoint import write_checkpoint
    from llama.tiny import TINY_PARAMS, random_state_dict
    from llama.model import ModelArgs
    from llama.tokenizer import Tokenizer

    n_words = Tokenizer(str(tiny_ckpt / "tokenizer.model")).n_words
    params = {**TINY_PARAMS, "vocab_size": n_words + 64}
    ckpt = write_checkpoint(tmp_path / "padded", params, random_state_dict(ModelArgs.from_params(params)),
                            tokenizer_path=tiny_ckpt / "tokenizer.model")
    llama = Llama.build(str(ckpt), max_seq_len=32, max_batch_size=2)
    padded = n_words + 5
    done = llama.submit(llama.tokenizer.encode("the cat", bos=True, eos=False), 6, temperature=0,
                        logit_bias={padded: 100.0}).wait()
    assert done.tokens == [padded] * 6
    assert done.text == ""
    assert llama.tokenizer.decode([padded, *llama.tokenizer.encode("the cat", bos=False, eos=False)]) == "the cat"
    assert llama.tokenizer.token_bytes(padded) == b""
    again = llama.text_completion(["the cat"], max_gen_len=4, temperature=0)  # still serving
    assert len(again) == 1


def test_a_request_whose_text_fails_ends_alone_with_its_error(tiny_llama, monkeypatch):
    """A failure while taking one request's token (its text, say) fails that request; the others finish, the
    engine goes on, and no caller waits forever."""
    prompts = [tiny_llama.tokenizer.encode(p, bos=True, eos=False) for p in ("the cat", "a dog")]
    bad, good = (tiny_llama.submit(p, 8, temperature=0) for p in prompts)

    def broken(token):
        raise UnicodeError("simulated: this request's text cannot be decoded")

    bad.request.stream.push = broken
    with pytest.raises(UnicodeError, match="simulated"):
        bad.wait()
    assert len(good.wait().tokens) == 8
    assert bad.request.finish_reason == "error"
    assert len(tiny_llama.text_completion(["the cat"], max_gen_len=3, temperature=0)) == 1
