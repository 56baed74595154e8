"""Run under torchrun by test_reliability.py: one rank fails inside on_every_rank."""
import sys

import torch.distributed as dist

from llama.distributed import on_every_rank


def step(kind: str):
    if dist.get_rank() != 1:
        return "fine"
    if kind == "value":
        raise ValueError("shard consolidated.01.pth is unreadable: download it again")
    raise KeyError("something internal")


def main(kind: str) -> None:
    dist.init_process_group("gloo")
    try:
        on_every_rank(lambda: step(kind))
    except Exception as e:  # report what this rank saw
        print(f"rank {dist.get_rank()} raised {type(e).__name__}: {e}", flush=True)
        dist.destroy_process_group()
        sys.exit(3)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
