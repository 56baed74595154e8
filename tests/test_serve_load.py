"""A bounded load test: 200 requests from 32 clients against 4 slots and a queue of 8. Each request gets its
own complete answer or a clear 429; the engine saw each accepted request exactly once."""
import json
import threading

import httpx
import pytest

pytest.importorskip("fastapi", reason="the serve tests need the serve extra: pip install -e '.[serve]'")

from llama import Llama  # noqa: E402
from llama.serve import ServeConfig  # noqa: E402
from llama.serve.server import serve_in_thread  # noqa: E402

CLIENTS, REQUESTS, MAX_TOKENS = 32, 200, 6


def body(k):
    """Request k: seeded sampling, so every answer is its own; every other one streamed."""
    return {"prompt": f"The bird {k} sang", "max_tokens": MAX_TOKENS, "temperature": 0.9, "seed": k,
            "stream": k % 2 == 0, "stream_options": {"include_usage": True} if k % 2 == 0 else None}


def read(response):
    """(text, finish_reason, completion_tokens, id) of a whole or streamed 200 answer."""
    if not response.headers["content-type"].startswith("text/event-stream"):
        response.read()
        data = response.json()
        c = data["choices"][0]
        return c["text"], c["finish_reason"], data["usage"]["completion_tokens"], data["id"]
    text, reason, tokens, ids, done = "", None, None, set(), False
    for line in response.iter_lines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            chunk = json.loads(line[6:])
            ids.add(chunk["id"])
            for c in chunk["choices"]:
                text += c["text"]
                reason = c["finish_reason"] or reason
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    assert done and len(ids) == 1, "a stream ended without [DONE], or mixed answers"
    return text, reason, tokens, ids.pop()


def test_200_requests_from_32_clients_each_answered_whole_or_refused_with_429(tiny_ckpt):
    ref = Llama.build(str(tiny_ckpt), max_seq_len=64, max_batch_size=1, device="cpu")
    g = Llama.build(str(tiny_ckpt), max_seq_len=64, max_batch_size=4, device="cpu")
    outcomes, problems = {}, []
    with serve_in_thread(g, model_name="tiny", max_queue=8, config=ServeConfig(page=False)) as server:
        stats = g.engine.stats
        submitted, finished = stats.requests_submitted, stats.requests_finished

        def client(i):
            with httpx.Client(base_url=server.url, timeout=60) as http:
                for k in range(i, REQUESTS, CLIENTS):
                    try:
                        with http.stream("POST", "/v1/completions", json=body(k)) as r:
                            if r.status_code == 200:
                                outcomes[k] = ("ok", read(r))
                            else:
                                r.read()
                                outcomes[k] = (r.status_code, r.json(), r.headers.get("retry-after"))
                    except Exception as e:  # noqa: BLE001 - reported below
                        problems.append((k, repr(e)))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a client never finished"
        assert not problems, problems[:3]
        assert sorted(outcomes) == list(range(REQUESTS))  # every request got an answer of some kind
        answered = {k: o[1] for k, o in outcomes.items() if o[0] == "ok"}
        refused = {k: o for k, o in outcomes.items() if o[0] != "ok"}
        assert answered and refused, "the load should both fill the queue and get through"
        for status, error, retry_after in refused.values():
            assert status == 429 and retry_after == "1"
            assert error["error"]["type"] == "rate_limit_error" and error["error"]["code"] == "queue_full"
            assert "limit is 8" in error["error"]["message"]
        for k, (text, reason, tokens, _) in answered.items():
            expected = ref.text_completion([f"The bird {k} sang"], temperature=0.9, top_p=1.0,
                                        max_gen_len=MAX_TOKENS, seed=k)[0]
            assert text == expected["generation"], k  # its own answer, complete
            assert reason in ("stop", "length") and (tokens == MAX_TOKENS or reason == "stop")
        assert len({a[3] for a in answered.values()}) == len(answered)  # no answer twice
        # the engine took each accepted request once and let it go; refused ones never reached it
        assert stats.requests_submitted - submitted == len(answered)
        assert stats.requests_finished - finished == len(answered)
        assert g.engine.pending() == (0, 0)
        registry = server.service.metrics.registry

        def answers(status):
            return registry.get_sample_value("llama_http_responses_total",
                                             {"path": "/v1/completions", "status": str(status)}) or 0
        assert answers(200) == len(answered)
        assert answers(429) == len(refused)
