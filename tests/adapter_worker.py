"""Run under torchrun by test_adapters.py: adapters registered at build (every rank alike), then, while
serve_forever runs, loaded and unloaded through rank 0 alone; saves what each rank saw."""
import shutil
import sys
import threading

import torch
import torch.distributed as dist

import llama.runner
from llama import Llama

PROMPTS = ["The cat sat on the", "Then the brave little girl ran into the dark forest and"]


def main(ckpt_dir: str, out_prefix: str, path_a: str, path_b: str) -> None:
    g = Llama.build(ckpt_dir, max_seq_len=64, max_batch_size=4, seed=3, adapters={"a": path_a})
    rank = dist.get_rank()
    tokens = torch.tensor([g.tokenizer.encode(PROMPTS[0], bos=True, eos=False)] * 2)
    result = {"logits": g.model(tokens, *g.model.layout(2, 0, tokens.shape[1]), torch.tensor([0, 1])),
              "spmd": [g.text_completion(PROMPTS, temperature=0, max_gen_len=12, adapter=a) for a in (None, "a")]}
    hidden = f"{out_prefix}-only-rank0"
    if rank == 0:
        shutil.copytree(path_b, hidden)
    dist.barrier()
    if rank > 0:
        opened = llama.runner.open_weights

        def open_here(path, model):  # a folder this rank cannot see
            if str(path) == hidden:
                raise OSError(f"rank 1 cannot read {path}")
            return opened(path, model)

        llama.runner.open_weights = open_here
        g.serve_forever()
    else:
        ready = threading.Event()
        server = threading.Thread(target=g.serve_forever, args=(ready.set,))
        server.start()
        ready.wait()
        g.load_adapter("b", path_b)  # rank 1 opens it when the next plan says so
        ids = g.tokenizer.encode(PROMPTS[1], bos=True, eos=False)
        result["served"] = [c.wait().tokens for c in [g.submit(ids, 12, temperature=0, adapter=a)
                                                      for a in (None, "a", "b")]]
        try:
            g.load_adapter("c", hidden)
        except Exception as e:  # noqa: BLE001 - what the test checks
            result["refused"] = f"{type(e).__name__}: {e}"
        assert sorted(g.adapters) == ["a", "b"], g.adapters
        g.unload_adapter("a")
        assert g.generate([ids], max_gen_len=12, temperature=0, adapter="b")[0][0] == result["served"][2]
        g.shutdown()
        server.join()
    torch.save(result, f"{out_prefix}.rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
