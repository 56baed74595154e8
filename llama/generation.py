"""`Llama`: build a model from a checkpoint, then generate, complete text and chat."""
from __future__ import annotations

import logging
import os
import time
from typing import List, Literal, Optional, Sequence, Tuple, TypedDict, Union

import torch
import torch.nn.functional as F

from llama.checkpoint import CheckpointError, find_shards, load_params, load_rank_state_dict
from llama.distributed import env_world_size, resolve_device, resolve_dtype, setup_model_parallel
from llama.model import ModelArgs, Transformer
from llama.quantize import check_mode, prepare_for_state_
from llama.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = List[Message]


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # present when logprobs=True
    logprobs: List[float]  # present when logprobs=True


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]
    logprobs: List[float]


# Llama 2 chat format.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
_SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def check_sampling(temperature: float, top_p: float) -> None:
    if not isinstance(temperature, (int, float)) or not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 means greedy)")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]; use 1.0 to disable nucleus sampling")


def sample_top_p(probs: torch.Tensor, top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Sample one token per row from the smallest set of tokens whose probability exceeds `top_p`."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs[mass_before > top_p] = 0.0  # the top token always survives: its mass_before is 0
    sorted_probs.div_(sorted_probs.sum(dim=-1, keepdim=True))
    choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        compile: bool = False,
        quantize: Optional[str] = None,
    ) -> "Llama":
        """Load a Meta-layout checkpoint for this process's model-parallel rank.

        Sets up torch.distributed and fairscale when they are not set up yet (nccl on CUDA,
        gloo on CPU; a plain `python` run is a world of one). Every argument and file is
        checked before the first collective call, so a bad input fails on every rank alike.
        """
        _check_positive_int("max_seq_len", max_seq_len)
        _check_positive_int("max_batch_size", max_batch_size)
        if not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an integer")
        mp_size = model_parallel_size or env_world_size()
        _check_positive_int("model_parallel_size", mp_size)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        check_mode(quantize)

        params = load_params(ckpt_dir)
        shards = find_shards(ckpt_dir)
        if len(shards) != mp_size:
            raise CheckpointError(
                f"{ckpt_dir} has {len(shards)} shard(s) but {mp_size} model-parallel process(es) were started: "
                f"run with torchrun --nproc_per_node {len(shards)}, or reshard the checkpoint")
        tokenizer = Tokenizer(tokenizer_path)
        try:
            args = ModelArgs.from_params(params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{os.path.join(ckpt_dir, 'params.json')}: {e}") from None
        if args.vocab_size <= 0:
            args.vocab_size = tokenizer.n_words
        elif tokenizer.n_words > args.vocab_size:
            raise CheckpointError(
                f"tokenizer {tokenizer_path} has {tokenizer.n_words} tokens but the model's vocab_size is "
                f"{args.vocab_size}: use the tokenizer.model that came with the checkpoint")

        start = time.perf_counter()
        rank, mp_size = setup_model_parallel(mp_size, device)
        state = load_rank_state_dict(ckpt_dir, rank, mp_size)
        model = Transformer(args)
        prepare_for_state_(model, state)  # int8 layout for a checkpoint from scripts/quantize.py
        state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in state.items()}
        _load_weights(model, state, shards[rank])
        model.to(device)  # buffers (RoPE table)
        model.eval().requires_grad_(False)
        model.setup_cache(max_batch_size, max_seq_len, device, dtype)
        model.optimize_(quantize=quantize, compile=compile)
        log.info("loaded %s (%d shard(s), %s on %s) in %.2f s", ckpt_dir, len(shards), dtype, device,
                 time.perf_counter() - start)
        return Llama(model, tokenizer, seed=seed)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, seed: int = 1):
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.tok_embeddings.weight.device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    @property
    def max_seq_len(self) -> int:
        return self.model.cache_shape[1]

    @property
    def max_batch_size(self) -> int:
        return self.model.cache_shape[0]

    def _check_prompts(self, prompt_tokens: Sequence[Sequence[int]]) -> None:
        if not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
            raise ValueError("prompt_tokens must be a non-empty list of token-id lists")
        if len(prompt_tokens) > self.max_batch_size:
            raise ValueError(f"{len(prompt_tokens)} prompts exceed max_batch_size={self.max_batch_size}: "
                             "pass fewer prompts per call or build with a larger max_batch_size")
        vocab = self.model.vocab_size
        for i, p in enumerate(prompt_tokens):
            if not isinstance(p, (list, tuple)) or not p:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. BOS)")
            if len(p) > self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens, more than max_seq_len={self.max_seq_len}: "
                                 "shorten it or build with a larger max_seq_len")
            if not all(isinstance(t, int) and 0 <= t < vocab for t in p):
                raise ValueError(f"prompt {i} holds token ids outside [0, {vocab})")

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt until EOS or `max_gen_len` new tokens (or the end of max_seq_len).

        All prompts are prefilled in one forward pass; each row then decodes at its own position.
        Returns the new tokens per row (the prompt too with `echo`) and, with `logprobs`, each
        returned token's log-probability (0.0 for the first prompt token, which has no context).
        """
        check_sampling(temperature, top_p)
        if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 0:
            raise ValueError(f"max_gen_len={max_gen_len!r} must be an integer >= 0")
        self._check_prompts(prompt_tokens)

        B = len(prompt_tokens)
        lens = [len(p) for p in prompt_tokens]
        limits = [min(max_gen_len, self.max_seq_len - n) for n in lens]  # new tokens each row may take
        prompt = torch.zeros((B, max(lens)), dtype=torch.long)  # right-padded; pads are never attended to
        for i, p in enumerate(prompt_tokens):
            prompt[i, : lens[i]] = torch.tensor(p)
        prompt = prompt.to(self.device)
        last = torch.tensor(lens, device=self.device) - 1

        h = self.model.hidden(prompt, 0)  # (B, T, dim)
        logits = self.model.logits(h[torch.arange(B, device=self.device), last])  # (B, vocab)
        prompt_logprobs = None
        if logprobs and echo:
            lp = F.log_softmax(self.model.logits(h[:, :-1]), dim=-1)  # (B, T-1, vocab)
            prompt_logprobs = lp.gather(-1, prompt[:, 1:, None]).squeeze(-1).tolist()
        del h

        new_tokens, new_logprobs = [], []
        pos = last + 1  # where each row's next token goes
        limit = torch.tensor(limits, device=self.device)
        done = limit == 0
        eos = self.tokenizer.eos_id
        for step in range(max(limits)):
            next_token = self._pick(logits, temperature, top_p)
            new_tokens.append(next_token)
            if logprobs:
                new_logprobs.append(F.log_softmax(logits, dim=-1).gather(-1, next_token[:, None]).squeeze(-1))
            done |= (next_token == eos) | (step + 1 >= limit)
            if bool(done.all()):
                break
            kv_len = min(max(lens) + step + 1, self.max_seq_len)
            h = self.model.hidden(next_token[:, None], pos.clamp(max=self.max_seq_len - 1), kv_len=kv_len)
            logits = self.model.logits(h[:, -1])
            pos = pos + 1

        generated = torch.stack(new_tokens, 1).tolist() if new_tokens else [[] for _ in range(B)]
        gen_lp = torch.stack(new_logprobs, 1).tolist() if new_logprobs else [[] for _ in range(B)]
        out_tokens, out_logprobs = [], []
        for i in range(B):
            toks, lps = generated[i][: limits[i]], gen_lp[i][: limits[i]]
            if eos in toks:
                cut = toks.index(eos)
                toks, lps = toks[:cut], lps[:cut]
            if echo:
                toks = list(prompt_tokens[i]) + toks
                if logprobs:
                    lps = [0.0] + prompt_logprobs[i][: lens[i] - 1] + lps
            out_tokens.append(toks)
            out_logprobs.append(lps)
        return out_tokens, (out_logprobs if logprobs else None)

    def _pick(self, logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        return sample_top_p(probs, top_p, self.generator)

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> List[CompletionPrediction]:
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError("prompts must be a list of strings")
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
        context = [[] if echo else p for p in prompt_tokens]
        return [self._prediction(c, t, lps[i] if logprobs else None, str)
                for i, (c, t) in enumerate(zip(context, tokens))]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> List[ChatPrediction]:
        """Answer each dialog as the assistant, in Llama 2's `[INST]` chat format."""
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        prompt_tokens = [self.encode_dialog(d) for d in dialogs]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs)
        return [self._prediction([], t, lps[i] if logprobs else None, "assistant") for i, t in enumerate(tokens)]

    def decode_continuation(self, context: List[int], tokens: List[int]) -> str:
        """The text `tokens` add after `context`, keeping the leading space SentencePiece drops
        when a piece is decoded on its own."""
        if not context:
            return self.tokenizer.decode(tokens)
        before = self.tokenizer.decode(context)
        full = self.tokenizer.decode(list(context) + list(tokens))
        return full[len(before):] if full.startswith(before) else self.tokenizer.decode(tokens)

    def _prediction(self, context: List[int], tokens: List[int], logprobs: Optional[List[float]], role) -> dict:
        text = self.decode_continuation(context, tokens)
        out = {"generation": text if role is str else {"role": role, "content": text}}
        if logprobs is not None:
            out["tokens"] = [self.tokenizer.decode([t]) for t in tokens]
            out["logprobs"] = logprobs
        return out

    def encode_dialog(self, dialog: Dialog) -> List[int]:
        """Llama 2 chat tokens: a system message folds into the first user turn; each finished
        (user, assistant) exchange is wrapped in BOS ... EOS; the last user turn is left open."""
        _check_dialog(dialog)
        if dialog[0]["role"] == "system":
            first = {"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
            dialog = [first] + list(dialog[2:])
        tokens: List[int] = []
        for user, answer in zip(dialog[::2], dialog[1::2]):
            text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
            tokens += self.tokenizer.encode(text, bos=True, eos=True)
        tokens += self.tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
        return tokens


def _check_dialog(dialog: Dialog) -> None:
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError("a dialog must be a non-empty list of {'role', 'content'} messages")
    for i, m in enumerate(dialog):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise ValueError(f"message {i} must be {{'role': 'system'|'user'|'assistant', 'content': str}}")
        if any(tag in m["content"] for tag in _SPECIAL_TAGS):
            raise ValueError(f"message {i} contains a reserved chat tag ({', '.join(_SPECIAL_TAGS)}): remove it")
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    expected = ["user", "assistant"] * len(turns)
    if not turns or [m["role"] for m in turns] != expected[: len(turns)] or turns[-1]["role"] != "user":
        raise ValueError("after an optional system message, roles must alternate user/assistant/... "
                         "and end with the user")


def _load_weights(model: Transformer, state: dict, path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensor names do not match the model (missing: {missing[:5]}, "
                              f"unexpected: {unexpected[:5]}): the checkpoint is not a LLaMA checkpoint of "
                              "this params.json")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)} but params.json implies "
                                  f"{tuple(expected[name].shape)}: the shard and params.json disagree")
    model.load_state_dict(state, assign=True)
