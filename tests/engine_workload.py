"""A mixed workload for the engine: each call made alone, then all of them from threads with staggered starts.

Shared by test_engine.py (one process) and engine_worker.py (rank 0 of a torchrun job). Every call's
answer from the threads must equal the same call made alone.
"""
import random
import threading
import time
from typing import Callable, Dict, List

from llama import Llama

N_CALLS = 12


def _prompts(n: int, seed: int = 0) -> List[List[int]]:
    rng = random.Random(seed)
    lengths = [rng.randrange(1, 30) for _ in range(n)]
    lengths[5] = 70  # longer than prefill_chunk: prefilled in several steps while others decode
    return [[1] + [rng.randrange(3, 500) for _ in range(k)] for k in lengths]


def calls(g: Llama) -> List[Callable[[], object]]:
    """N_CALLS calls of every kind, each returning something comparable with ==."""
    prompts = _prompts(N_CALLS)
    tok = g.tokenizer
    out: List[Callable[[], object]] = []
    for i, p in enumerate(prompts):
        text = tok.decode(p[1:])
        kind = i % 6
        if kind == 0:
            out.append(lambda p=p: g.generate([p], max_gen_len=20, temperature=0, logprobs=True))
        elif kind == 1:
            out.append(lambda p=p, i=i: g.generate([p], max_gen_len=20, temperature=0.9, top_p=0.95, top_k=40, seed=i))
        elif kind == 2:
            out.append(lambda text=text: ["".join(x[0] for x in g.stream([text], temperature=0, max_gen_len=16))])
        elif kind == 3:
            out.append(lambda text=text: g.text_completion([text], temperature=0, max_gen_len=16, stop=["e"]))
        elif kind == 4:
            out.append(lambda text=text, i=i: g.chat_completion([[{"role": "user", "content": text}]],
                                                                temperature=0.8, max_gen_len=12, seed=i))
        else:
            out.append(lambda p=p: [tuple(s) for s in g.score_tokens([(p[:2], p[2:]), (p[:1], p[1:4])])])
    return out


def conversation(g: Llama, turns: int = 4) -> List[object]:
    """A multi-turn exchange as a chat client sends it: each turn's prompt is the last one, its answer and a
    new message, so the prefix cache holds most of it. Each turn: (tokens, logprobs, cached prompt tokens)."""
    rng = random.Random(1)
    prompt = [1] + [rng.randrange(3, 500) for _ in range(20)]
    out = []
    for _ in range(turns):
        c = g.submit(prompt, 8, temperature=0, logprobs=True).wait()
        out.append([c.tokens, c.logprobs, c.cached_tokens])
        prompt = prompt + c.tokens + [rng.randrange(3, 500) for _ in range(5)]
    return out


def assert_same(got, expected, where: str = "") -> None:
    """Equal, floats within 1e-4 (a batch of other rows may change the last bits of a log-probability)."""
    if isinstance(expected, float):
        assert abs(got - expected) <= 1e-4 * max(1.0, abs(expected)), f"{where}: {got} != {expected}"
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), f"{where}: {got!r} != {expected!r}"
        for k, (a, b) in enumerate(zip(got, expected)):
            assert_same(a, b, f"{where}[{k}]")
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), f"{where}: {got!r} != {expected!r}"
        for k in expected:
            assert_same(got[k], expected[k], f"{where}[{k!r}]")
    else:
        assert got == expected, f"{where}: {got!r} != {expected!r}"


def alone(g: Llama) -> List[object]:
    return [call() for call in calls(g)]


def together(g: Llama, stagger_s: float = 0.005) -> Dict[str, object]:
    """Every call from its own thread, thread i starting i * stagger_s after the first."""
    results: List[object] = [None] * N_CALLS
    errors: List[BaseException] = []

    def run(i: int, call: Callable[[], object]) -> None:
        time.sleep(i * stagger_s)
        try:
            results[i] = call()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls(g))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a call never returned"
    assert not errors, errors
    return results
