"""Run under torchrun by test_engine.py: rank 0 serves the engine workload's calls from threads, the
other ranks follow its steps; rank 0 writes what it got."""
import json
import sys
import threading

from engine_workload import alone, conversation, together
from llama import Llama


def main(ckpt_dir: str, out: str) -> None:
    g = Llama.build(ckpt_dir, max_seq_len=96, max_batch_size=4, device="cpu", prefill_chunk=16)
    if g.engine.mp_rank != 0:
        g.serve_forever()  # returns when rank 0 shuts down
        return
    server = threading.Thread(target=g.serve_forever)
    server.start()
    report = {"alone": alone(g), "together": together(g), "conversation": conversation(g)}
    g.shutdown()
    server.join(timeout=30)
    with open(out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
