"""Tiny random-weight checkpoints: the demo model of example.py and the fixtures of the tests.

Everything here is deterministic for a given seed, so N processes that each build the same
tiny checkpoint get identical files without talking to each other.
"""
from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import List, Optional

import torch

from llama.checkpoint import StateDict, full_shapes, write_checkpoint
from llama.model import ModelArgs

TINY_PARAMS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5, rope_theta=10000.0)

_WORDS = (
    "the a an one two three cat dog bird fish girl boy mother father friend teacher king queen "
    "sat ran jumped walked sang played saw found loved wanted made gave took looked asked said "
    "on in under over near with to from into of and but so then because when while after "
    "park garden house river forest school castle sky tree flower ball book cake box door road "
    "happy sad big small red blue green yellow bright dark quiet loud fast slow kind brave little"
).split()


def _corpus(seed: int, n_lines: int = 3000) -> List[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "!", "?", ",", ";"]) + f" {rng.randint(0, 999)}")
    return lines


def train_tokenizer(path: str | os.PathLike, vocab_size: int = 512, seed: int = 0) -> Path:
    """Train a byte-fallback SentencePiece BPE model (unk=0, bos=1, eos=2, no pad) in milliseconds."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(seed)), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, num_threads=1, hard_vocab_limit=False, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    )
    Path(path).write_bytes(buf.getvalue())
    return Path(path)


def random_state_dict(args: ModelArgs, seed: int = 0, std: float = 0.08) -> StateDict:
    """Whole-model random weights in Meta's names and (out, in) shapes, float32: norms near 1, the
    embedding and output wide enough that greedy text varies."""
    gen = torch.Generator().manual_seed(seed)
    scale = {"tok_embeddings.weight": 10.0, "output.weight": 3.0}
    sd: StateDict = {}
    for name, shape in full_shapes(args).items():
        t = torch.randn(*shape, generator=gen) * std
        sd[name] = 1.0 + t if len(shape) == 1 else t * scale.get(name, 1.0)
    return sd


def make_tiny_checkpoint(out_dir: str | os.PathLike, num_shards: int = 1, seed: int = 0,
                         params: Optional[dict] = None, vocab_size: int = 512) -> Path:
    """Write params.json, consolidated.NN.pth and a freshly trained tokenizer.model to `out_dir`."""
    from llama.tokenizer import Tokenizer

    out = Path(out_dir)
    tok_tmp = out.parent / f".{out.name}.tokenizer.model"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        train_tokenizer(tok_tmp, vocab_size=vocab_size, seed=seed)
        params = {**TINY_PARAMS, **(params or {}), "vocab_size": Tokenizer(tok_tmp).n_words}
        state = random_state_dict(ModelArgs.from_params(params), seed=seed)
        return write_checkpoint(out, params, state, num_shards=num_shards, tokenizer_path=tok_tmp)
    finally:
        tok_tmp.unlink(missing_ok=True)


def write_random_adapter(out_dir: str | os.PathLike, args: ModelArgs, r: int = 16, lora_alpha: float = 32.0,
                         seed: int = 0, std: float = 0.02, dtype: torch.dtype = torch.float32) -> Path:
    """A PEFT LoRA adapter folder on every linear of every layer (target_modules="all-linear") with random
    factors, as PeftModel.save_pretrained lays it out: for benchmarks, without peft. Written to a
    temporary name, then renamed."""
    import json
    import shutil

    from safetensors.torch import save_file

    from llama.hf import hf_name

    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (rows, cols) in ((n, s) for n, s in full_shapes(args).items() if n.startswith("layers.") and len(s) == 2):
        module = "base_model.model." + hf_name(name)[: -len(".weight")]
        tensors[f"{module}.lora_A.weight"] = (torch.randn(r, cols, generator=gen) * std).to(dtype)
        tensors[f"{module}.lora_B.weight"] = (torch.randn(rows, r, generator=gen) * std).to(dtype)
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "target_modules": "all-linear",
              "bias": "none", "task_type": "CAUSAL_LM"}
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
