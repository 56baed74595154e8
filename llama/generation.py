"""`Llama`: build a model from a checkpoint, then generate, stream, complete text, chat and score.

Every method turns its prompts into engine requests (llama.engine), one per prompt, and waits for
them; calls from several threads share the engine's steps.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from typing import (Callable, Collection, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, TypedDict,
                    Union)

import torch

from llama.adapters import AdapterWeights, check_folder, check_name, open_weights
from llama.chat_format import Dialog, Message, check_chat_format, check_chat_format_name, encode_dialog
from llama.distributed import env_world_size, on_every_rank, resolve_device, resolve_dtype
from llama.engine import Engine, Request
from llama.errors import check_positive_int
from llama.loading import load_model
from llama.model import Transformer
from llama.quantize import check_mode
from llama.sampling import SamplingParams
from llama.text import decode_continuation, stop_matcher
from llama.tokenizer import AnyTokenizer

log = logging.getLogger(__name__)

Stop = Union[str, Sequence[str], None]
# SamplingParams fields the generation methods take as keyword arguments beyond Meta's (their `**sampling`)
MORE_SAMPLING = frozenset({"min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
                           "top_logprobs", "constraint"})


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # present when logprobs=True
    logprobs: List[float]  # present when logprobs=True
    top_logprobs: List[Optional[dict]]  # present with top_logprobs: {token text: log-probability} per token


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]
    logprobs: List[float]


class Score(NamedTuple):
    logprob: float  # summed log-probability of the continuation given the context
    is_greedy: bool  # every continuation token is the argmax given everything before it
    n_tokens: int  # continuation tokens scored


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: Optional[str] = None,
        max_seq_len: Optional[int] = None,
        max_batch_size: int = 4,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        compile: bool = False,
        quantize: Optional[str] = None,
        prefill_chunk: int = 128,
        lora: Optional[str] = None,
        chat_format: Optional[str] = None,
        group_size: Optional[int] = None,
        kv_cache_tokens: Optional[int] = None,
        prefix_cache: bool = True,
        adapters: Optional[Dict[str, Union[str, os.PathLike]]] = None,
    ) -> "Llama":
        """Load a Meta-layout or Hugging Face checkpoint for this process's model-parallel rank.

        A checkpoint of S shards runs on M model-parallel processes when S % M == 0 or M % S == 0;
        each rank reads only its slices. `tokenizer_path` defaults to CKPT_DIR/tokenizer.model.
        Sets up torch.distributed and fairscale when they are not set up yet (nccl on CUDA,
        gloo on CPU; a plain `python` run is a world of one). Arguments are checked before that;
        files, which hosts may see differently, right after, and every rank agrees on the outcome
        before loading, so a bad input fails on every rank alike.

        At most `max_batch_size` requests run at once, each up to `max_seq_len` tokens; more wait.
        `max_seq_len` defaults to the checkpoint's own context (params.json's `max_seq_len`, a Hugging Face
        config's `max_position_embeddings`), or to llama.loading.DEFAULT_MAX_SEQ_LEN (2048) when it states
        none. The requests' keys and values live in a paged KV cache of `kv_cache_tokens` positions, all
        of them together (default max_batch_size x max_seq_len, or what fits in memory), where a request takes
        blocks as it grows; when it runs out, the newest request is preempted and recomputed later. With
        `prefix_cache`, a prompt that starts like an earlier one (a chat's history, a shared system
        prompt) reuses that prefix's keys and values. A step prefills at most `prefill_chunk` prompt
        tokens. `lora` is a PEFT LoRA adapter folder merged into the weights as they load (llama.lora);
        `adapters` ({name: folder}) are PEFT LoRA adapters loaded unmerged, each request choosing one by name
        (see `load_adapter`). `chat_format` ('llama2', 'llama3' or 'alpaca'; default: the tokenizer's) is the
        prompt format of chat_completion, stream_chat and encode_dialog. `quantize` ("int8" or "int4") quantizes the weights as they load;
        `group_size` is int4's (32, 64, 128 or 256; default 128, or the largest that divides a layer's
        in-features; layers none divides stay int8; see llama.quantize).
        """
        if max_seq_len is not None:
            check_positive_int("max_seq_len", max_seq_len)
        check_positive_int("max_batch_size", max_batch_size)
        check_positive_int("prefill_chunk", prefill_chunk)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed={seed!r} must be an integer")
        mp_size = model_parallel_size or env_world_size()
        check_positive_int("model_parallel_size", mp_size)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        check_mode(quantize, group_size)
        check_chat_format_name(chat_format)
        if kv_cache_tokens is not None:
            check_positive_int("kv_cache_tokens", kv_cache_tokens)
        if not isinstance(prefix_cache, bool):
            raise ValueError(f"prefix_cache={prefix_cache!r} must be True or False")
        if adapters is not None:
            if not isinstance(adapters, dict):
                raise TypeError(f"adapters must be a dict of names to PEFT adapter folders, not "
                                f"{type(adapters).__name__}")
            for name, path in adapters.items():
                check_name(name)
                check_folder(path)
        model, tokenizer = load_model(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, mp_size, device, dtype,
                                      compile=compile, quantize=quantize, lora=lora, group_size=group_size,
                                      kv_cache_tokens=kv_cache_tokens)
        llama = Llama(model, tokenizer, seed=seed, prefill_chunk=prefill_chunk, chat_format=chat_format,
                      prefix_cache=prefix_cache)
        for name, path in (adapters or {}).items():
            llama.load_adapter(name, path)
        return llama

    def __init__(self, model: Transformer, tokenizer: AnyTokenizer, seed: int = 1, prefill_chunk: int = 128,
                 chat_format: Optional[str] = None, prefix_cache: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.chat_format = check_chat_format(chat_format, tokenizer)  # the name in use, default resolved
        self.device = model.tok_embeddings.weight.device
        self.generator = torch.Generator().manual_seed(seed)  # draws the seeds of calls made without one
        self._seed_lock = threading.Lock()
        self._spmd_call: Optional[int] = None  # the thread in a call, under model parallelism without serving
        self.engine = Engine(model, tokenizer, prefill_chunk, prefix_cache)

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def max_batch_size(self) -> int:
        return self.engine.max_batch_size

    # LoRA adapters, unmerged.

    def load_adapter(self, name: str, path: Union[str, os.PathLike]) -> None:
        """Load the PEFT LoRA adapter folder `path` beside the base weights, unmerged, as `name`: requests
        that pass adapter=name run with its update, requests for other adapters or for the base share their
        batch (llama.adapters). The folder is checked as for merging (unsupported options refused by name,
        target modules and shapes against this model); modules_to_save, which would replace base tensors,
        is refused: merge such an adapter instead (`build(lora=...)`). Safe while requests run: the adapter
        is opened here, then takes a slot between two steps. Loading a name again replaces it: requests
        already running keep the old weights to their end. Under model parallelism, call it on every rank
        alike, or, while serve_forever runs, on rank 0 alone (the other ranks open the folder too)."""

        def check() -> AdapterWeights:
            check_name(name)
            return open_weights(check_folder(path), self.model)

        previous = self._spmd_call
        try:
            weights = self._agreed(check, (name, str(path)), "adapter name or path")
            self.engine.load_adapter(name, weights)
        finally:
            self._spmd_call = previous
        log.info("adapter %r loaded from %s (%.1f MB)", name, path, weights.nbytes / 1e6)

    def unload_adapter(self, name: str) -> None:
        """Unload adapter `name`: requests for it are refused from now on; its memory slot is freed (for
        the next load to reuse) once the requests already using it have finished, which they do with it."""
        previous = self._spmd_call
        try:
            self._agreed(lambda: self._check_adapter(name), name, "adapter name")
            self.engine.unload_adapter(name)
        finally:
            self._spmd_call = previous

    @property
    def adapters(self) -> Dict[str, str]:
        """The loaded adapters: {name: folder}."""
        with self.engine.lock:
            return {name: self.engine.adapters.by_name[name].path for name in self.engine.adapters.names()}

    def _check_adapter(self, adapter: Optional[str]) -> None:
        if adapter is not None:
            with self.engine.lock:
                self.engine.adapters.lookup(adapter)

    # Generation.

    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: int = 0,
        stop: Stop = None,
        stop_tokens: Optional[Collection[int]] = None,
        seed: Optional[int] = None,
        adapter: Optional[str] = None,
        **sampling,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt until a stop token, a stop string, or `max_gen_len` new tokens (or
        the end of max_seq_len).

        Stop tokens are the tokenizer's (EOS; for Llama 3 also <|eot_id|> and <|eom_id|>) plus
        `stop_tokens`; they are not returned. A row that meets a `stop` string ends with the token
        that completed it. Returns the new tokens per row (the prompt too with `echo`) and, with
        `logprobs`, each returned token's log-probability (0.0 for the first prompt token). Prompt i
        samples from a generator seeded with `seed + i` (`seed` None: drawn from this object's
        generator), so a seeded prompt gets the same tokens whatever else runs.

        `**sampling` takes further llama.sampling.SamplingParams fields, here and in every method below:
        min_p, presence_penalty, frequency_penalty, repetition_penalty, logit_bias ({token id: bias}),
        top_logprobs (with logprobs: the most likely alternatives at each position) and constraint (a
        llama.sampling.Constraint: a JSON Schema, any JSON object, a regex or a grammar the text must match).

        `adapter`, here and in every method below, names a LoRA adapter loaded with `load_adapter` to run
        these prompts with (None: the base model); other requests, with other adapters or none, share the
        batch.
        """
        contexts = prompt_tokens if stop else None  # stop strings need the text
        requests = self._start(prompt_tokens, contexts, max_gen_len, temperature, top_p, top_k, stop, stop_tokens,
                               logprobs, echo, seed, adapter=adapter, sampling=sampling)
        self._wait(requests)
        tokens = [(r.prompt if echo else []) + r.tokens for r in requests]
        if not logprobs:
            return tokens, None
        return tokens, [([0.0] + r.prompt_logprobs if echo else []) + r.token_logprobs for r in requests]

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: int = 0,
        stop: Stop = None,
        stop_tokens: Optional[Collection[int]] = None,
        seed: Optional[int] = None,
        adapter: Optional[str] = None,
        **sampling,
    ) -> List[CompletionPrediction]:
        """Complete each prompt; the text ends before the first `stop` string, if any appears."""
        prompt_tokens = self._encode_prompts(prompts)
        requests = self._start(prompt_tokens, prompt_tokens, self._gen_len(max_gen_len), temperature, top_p, top_k,
                               stop, stop_tokens, logprobs, echo, seed, adapter=adapter, sampling=sampling)
        self._wait(requests)
        return [self._prediction(r, logprobs, echo) for r in requests]

    def stream(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        *,
        top_k: int = 0,
        stop: Stop = None,
        stop_tokens: Optional[Collection[int]] = None,
        seed: Optional[int] = None,
        adapter: Optional[str] = None,
        **sampling,
    ) -> "Stream":
        """`text_completion` as it happens: yields, after each decoding step that adds text, one
        string per prompt with its new text ('' where none). Each prompt's pieces join up to its
        `text_completion` generation exactly. Arguments are checked, and the prompts queued, before
        this returns; closing the stream (or dropping it) frees their slots."""
        prompt_tokens = self._encode_prompts(prompts)
        requests = self._start(prompt_tokens, prompt_tokens, self._gen_len(max_gen_len), temperature, top_p, top_k,
                               stop, stop_tokens, seed=seed, follow=True, adapter=adapter, sampling=sampling)
        return Stream(self, requests)

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        *,
        top_k: int = 0,
        stop: Stop = None,
        stop_tokens: Optional[Collection[int]] = None,
        seed: Optional[int] = None,
        adapter: Optional[str] = None,
        **sampling,
    ) -> List[ChatPrediction]:
        """Answer each dialog as the assistant, in `self.chat_format` (by default the tokenizer's: Llama 2's
        `[INST]` for SentencePiece, Llama 3's headers and <|eot_id|> for tiktoken)."""
        prompt_tokens = self._encode_dialogs(dialogs)
        requests = self._start(prompt_tokens, [[]] * len(prompt_tokens), self._gen_len(max_gen_len), temperature,
                               top_p, top_k, stop, stop_tokens, logprobs, seed=seed, adapter=adapter,
                               sampling=sampling)
        self._wait(requests)
        return [self._prediction(r, logprobs, False, role="assistant") for r in requests]

    def stream_chat(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        *,
        top_k: int = 0,
        stop: Stop = None,
        stop_tokens: Optional[Collection[int]] = None,
        seed: Optional[int] = None,
        adapter: Optional[str] = None,
        **sampling,
    ) -> "Stream":
        """`chat_completion` as it happens, yielding like `stream`."""
        prompt_tokens = self._encode_dialogs(dialogs)
        requests = self._start(prompt_tokens, [[]] * len(prompt_tokens), self._gen_len(max_gen_len), temperature,
                               top_p, top_k, stop, stop_tokens, seed=seed, follow=True, adapter=adapter,
                               sampling=sampling)
        return Stream(self, requests)

    def decode_continuation(self, context: List[int], tokens: List[int]) -> str:
        """The text `tokens` add after `context` (see llama.text.decode_continuation)."""
        return decode_continuation(self.tokenizer, context, tokens)

    def encode_dialog(self, dialog: Dialog, tools: Optional[List[dict]] = None) -> List[int]:
        """The chat prompt tokens for `dialog` in `self.chat_format`, with `tools` the assistant may call
        (OpenAI's definitions; Llama 3.1's format, llama.chat_format)."""
        return encode_dialog(self.tokenizer, dialog, self.chat_format, tools)

    # Scoring.

    def score_tokens(self, pairs: Sequence[Tuple[Sequence[int], Sequence[int]]],
                     adapter: Optional[str] = None) -> List[Score]:
        """For each (context, continuation) pair of token lists: the continuation's summed
        log-probability given the context, and whether greedy decoding would produce it.

        Each pair is a request that prefills and samples nothing; under model parallelism every rank
        returns the same scores.
        """
        def check():
            self._check_adapter(adapter)
            return self._check_pairs(pairs)

        seqs, starts = self._agreed(check, (pairs, adapter), "pairs")
        params = SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=True)
        requests = [Request(prompt=s, params=params, max_new=0, index=i, adapter=adapter)
                    for i, s in enumerate(seqs)]
        self._submit(requests)
        self._wait(requests)
        scores = []
        for r, n in zip(requests, starts):
            # prompt_logprobs[t] is the log-probability of token t + 1: the continuation's come from n - 1 on
            lp = torch.tensor(r.prompt_logprobs[n - 1 :], dtype=torch.float64)
            scores.append(Score(float(lp.sum()), all(r.prompt_greedy[n - 1 :]), len(r.prompt) - n))
        return scores

    def score(self, pairs: Sequence[Tuple[str, str]], adapter: Optional[str] = None) -> List[Score]:
        """`score_tokens` for (context, continuation) strings, as evaluation harnesses compute
        loglikelihood: the continuation's tokens are those of `context + continuation` after the
        tokens it shares with `context` alone (BOS first)."""
        if not isinstance(pairs, (list, tuple)):
            raise TypeError("pairs must be a list of (context, continuation) strings")
        token_pairs = []
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise ValueError(f"pair {i} must be a (context, continuation) tuple of strings")
            whole = self.tokenizer.encode(pair[0] + pair[1], bos=True, eos=False)
            head = self.tokenizer.encode(pair[0], bos=True, eos=False)
            n = next((k for k, (a, b) in enumerate(zip(head, whole)) if a != b), min(len(head), len(whole)))
            token_pairs.append((whole[:n], whole[n:]))
        return self.score_tokens(token_pairs, adapter)

    def perplexity(self, texts: Sequence[str], adapter: Optional[str] = None) -> List[float]:
        """Per-text perplexity: exp of the mean negative log-probability of its tokens after BOS."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError("texts must be a list of strings")
        pairs = [([self.tokenizer.bos_id], self.tokenizer.encode(t, bos=False, eos=False)) for t in texts]
        return [math.exp(-s.logprob / s.n_tokens) for s in self.score_tokens(pairs, adapter)]

    # Serving.

    def submit(
        self,
        prompt_tokens: List[int],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        *,
        top_k: int = 0,
        stop: Stop = None,
        stop_tokens: Optional[Collection[int]] = None,
        logprobs: bool = False,
        echo: bool = False,
        seed: Optional[int] = None,
        decode_after: Optional[List[int]] = None,
        max_waiting: Optional[int] = None,
        on_change: Optional[Callable[[], None]] = None,
        params: Optional[SamplingParams] = None,
        adapter: Optional[str] = None,
        **sampling,
    ) -> "Completion":
        """Queue one prompt and return at once: a `Completion` to iterate for its output as it comes, or
        to wait for. What a server calls from its request threads; under model parallelism only rank 0
        submits, while serve_forever runs.

        The arguments are those of `generate`; `params`, a SamplingParams, replaces every sampling argument
        (`temperature` ... `**sampling`) but the seed and `max_gen_len`. The text is decoded after `decode_after` (default: the
        prompt; a chat answer passes []). With `max_waiting`, a prompt that would make more than that
        many requests wait for a slot raises llama.engine.QueueFull instead. `on_change`, if given, is
        called whenever the request gets tokens or ends, from the engine's thread with its lock held: it
        must return at once and not call into this object (an event loop's call_soon_threadsafe, say,
        after which the loop reads `Completion.poll`), so that a server needs no thread per request.
        """
        context = list(prompt_tokens) if decode_after is None and isinstance(prompt_tokens, list) else decode_after
        requests = self._start([prompt_tokens], [context], max_gen_len, temperature, top_p, top_k, stop,
                               stop_tokens, logprobs, echo, seed, max_waiting=max_waiting, follow=True,
                               on_change=on_change, sampling=sampling, params=params, adapter=adapter)
        return Completion(self, requests[0])

    def serve_forever(self, on_ready: Optional[Callable[[], None]] = None) -> None:
        """Serve requests from other threads until `shutdown`. On rank 0, call it in a thread of its own
        and make calls from any other threads once `on_ready` has been called; on every other rank, call
        it instead of making calls: it runs rank 0's steps and returns once rank 0 shuts down."""
        self.engine.serve_forever(on_ready)

    def compile_all(self) -> int:
        """With compile=True: compile the decode step for every bucket now (on every rank alike, before
        any request), so that no request waits for a compilation later; returns how many."""
        return self.engine.compile_all()

    def shutdown(self) -> None:
        """Stop serving: queued and running requests end (finish_reason "cancelled"), new calls are refused,
        and the other ranks' serve_forever returns."""
        self.engine.shutdown()

    # Requests.

    def _start(self, prompt_tokens: List[List[int]], contexts: Optional[List[List[int]]], max_gen_len: int,
               temperature: float, top_p: float, top_k: int, stop: Stop, stop_tokens: Optional[Collection[int]],
               logprobs: bool = False, echo: bool = False, seed: Optional[int] = None,
               max_waiting: Optional[int] = None, follow: bool = False,
               on_change: Optional[Callable[[], None]] = None, sampling: Optional[dict] = None,
               params: Optional[SamplingParams] = None, adapter: Optional[str] = None) -> List[Request]:
        """Check every argument (agreeing with the other ranks, under model parallelism, that they got the
        same, valid ones), then queue one request per prompt. A request decodes text after its context,
        or none where `contexts` is None. `sampling`: more SamplingParams fields (penalties, ...)."""
        sampling, given = dict(sampling or {}), params

        def check() -> Tuple[SamplingParams, int]:
            if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 0:
                raise ValueError(f"max_gen_len={max_gen_len!r} must be an integer >= 0")
            unknown = sorted(set(sampling) - MORE_SAMPLING)
            if unknown:
                raise TypeError(f"unknown sampling argument(s) {', '.join(unknown)}: the others are "
                                f"{', '.join(sorted(MORE_SAMPLING))}")
            if given is not None:  # one SamplingParams for everything; only its max_tokens and seed are per call
                params = dataclasses.replace(given, max_tokens=max_gen_len, seed=seed)
            else:
                params = SamplingParams(temperature, top_p, top_k, max_tokens=max_gen_len, stop=stop,
                                        stop_token_ids=stop_tokens or (), seed=seed, logprobs=logprobs,
                                        prompt_logprobs=logprobs and echo, **sampling)
            self._check_prompts(prompt_tokens)
            vocab = self.model.vocab_size
            if not all(t < vocab for t in params.stop_token_ids):
                raise ValueError(f"stop_tokens={stop_tokens!r} must be token ids in [0, {vocab})")
            if any(t >= vocab for t, _ in params.logit_bias):
                raise ValueError(f"logit_bias names token {max(t for t, _ in params.logit_bias)}: ids must be in "
                                 f"[0, {vocab})")
            if params.constraint is not None:
                self.engine.grammars.check(params.constraint)
            self._check_adapter(adapter)
            return params, self._draw_seed() if seed is None else seed

        same = (prompt_tokens, max_gen_len, temperature, top_p, top_k, stop, stop_tokens, logprobs, echo, seed,
                sorted(sampling.items(), key=lambda kv: kv[0]), given, adapter)
        params, base_seed = self._agreed(check, same, "prompts or sampling arguments")
        if params.stop:
            stop_matcher(params.stop)  # built here, not under the engine's lock, where the requests' streams find it
        stop_ids = self.tokenizer.stop_ids | params.stop_token_ids
        requests = [Request(prompt=list(p), params=params, max_new=min(max_gen_len, self.max_seq_len - len(p)),
                            seed=base_seed + i, stop_ids=stop_ids,
                            text_context=None if contexts is None else list(contexts[i]), index=i, follow=follow,
                            adapter=adapter)
                    for i, p in enumerate(prompt_tokens)]
        self._submit(requests, max_waiting, on_change)
        return requests

    def _agreed(self, check, same, what: str):
        """`check()` here, and under model parallelism (unless rank 0 serves) on every rank, with the
        ranks agreeing that they were given the same inputs."""
        if self.engine.mp_size == 1 or self.engine.serving:
            if not self.engine.leader:
                raise RuntimeError("this rank runs rank 0's requests (serve_forever): make calls on rank 0")
            return check()
        me = threading.get_ident()
        if self._spmd_call not in (None, me):  # refused before any collective: another thread's would interleave
            raise RuntimeError("under model parallelism one thread per rank makes calls, every rank the same ones; "
                               "to take calls from several threads, run serve_forever() on every rank but 0 and in "
                               "a thread of rank 0")
        self._spmd_call = me
        try:
            return on_every_rank(check, same=same, what=what)
        except BaseException:
            self._spmd_call = None
            raise

    def _submit(self, requests: List[Request], max_waiting: Optional[int] = None,
                on_change: Optional[Callable[[], None]] = None) -> None:
        waiter = self.engine.waiter() if on_change is None else _Notifying(self.engine.lock, on_change)
        self.engine.submit(requests, waiter, max_waiting)

    def _wait(self, requests: List[Request], text: bool = False, more: Optional[Callable[[], bool]] = None) -> None:
        """Wait until every request is done (with `text`, until one has text to pop, or `more()`); if one
        fails, cancel the others and raise its error."""

        def until() -> bool:
            return (all(r.done for r in requests) or any(r.error for r in requests)
                    or (text and any(r.stream.ready() for r in requests)) or (more is not None and more()))

        try:
            self.engine.run(until, requests[0].waiter)
        finally:
            if not text or any(r.error for r in requests):
                self.engine.cancel([r for r in requests if not r.done])
            if all(r.done for r in requests):
                self._spmd_call = None
        failed = next((r for r in requests if r.error is not None), None)
        if failed is not None:
            raise failed.error

    def _draw_seed(self) -> int:
        with self._seed_lock:
            return int(torch.randint(2**62, (), generator=self.generator))

    def _check_tokens(self, what: str, tokens: Sequence[int], limit: int) -> None:
        if not isinstance(tokens, (list, tuple)) or not tokens:
            raise ValueError(f"{what} is empty: every prompt needs at least one token (e.g. BOS)")
        if len(tokens) > self.max_seq_len:
            raise ValueError(f"{what} has {len(tokens)} tokens, more than max_seq_len={self.max_seq_len}: "
                             "shorten it or raise max_seq_len")
        if len(tokens) > limit:
            raise ValueError(f"{what} has {len(tokens)} tokens, which leaves no room for a new one in "
                             f"max_seq_len={self.max_seq_len}: shorten it or raise max_seq_len")
        vocab = self.model.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens):
            raise ValueError(f"{what} holds token ids outside [0, {vocab})")

    def _check_prompts(self, prompt_tokens: Sequence[Sequence[int]]) -> None:
        if not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
            raise ValueError("prompt_tokens must be a non-empty list of token-id lists")
        if len(prompt_tokens) > self.max_batch_size:
            raise ValueError(f"{len(prompt_tokens)} prompts exceed max_batch_size={self.max_batch_size}: "
                             "pass fewer prompts per call or raise max_batch_size")
        for i, p in enumerate(prompt_tokens):
            self._check_tokens(f"prompt {i}", p, self.max_seq_len - 1)

    def _check_pairs(self, pairs: Sequence[Tuple[Sequence[int], Sequence[int]]]) -> Tuple[List[List[int]], List[int]]:
        """Each pair's whole token sequence and where its continuation starts."""
        if not isinstance(pairs, (list, tuple)) or not pairs:
            raise ValueError("pairs must be a non-empty list of (context, continuation) token lists")
        seqs, starts = [], []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"pair {i} must be a (context, continuation) tuple")
            context, continuation = list(pair[0]), list(pair[1])
            if not context or not continuation:
                raise ValueError(f"pair {i} has an empty context or continuation: the context needs at least "
                                 "BOS and the continuation at least one token")
            self._check_tokens(f"pair {i} (context + continuation)", context + continuation, self.max_seq_len)
            seqs.append(context + continuation)
            starts.append(len(context))
        return seqs, starts

    def _encode_prompts(self, prompts: List[str]) -> List[List[int]]:
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError("prompts must be a list of strings")
        return [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]

    def _encode_dialogs(self, dialogs: List[Dialog]) -> List[List[int]]:
        if not isinstance(dialogs, (list, tuple)):
            raise TypeError("dialogs must be a list of dialogs (lists of messages)")
        return [self.encode_dialog(d) for d in dialogs]

    def _gen_len(self, max_gen_len: Optional[int]) -> int:
        return self.max_seq_len - 1 if max_gen_len is None else max_gen_len

    def _prediction(self, r: Request, logprobs: bool, echo: bool, role: Optional[str] = None) -> dict:
        text = r.stream.text
        if echo:
            text = self.tokenizer.decode(r.prompt) + text
        out = {"generation": text if role is None else {"role": role, "content": text}}
        if logprobs:
            tokens = (r.prompt if echo else []) + r.tokens
            out["tokens"] = [self.tokenizer.decode([t]) for t in tokens]
            out["logprobs"] = ([0.0] + r.prompt_logprobs if echo else []) + r.token_logprobs
            if r.params.top_logprobs:
                tops = ([None] + r.prompt_top_logprobs if echo else []) + r.token_top_logprobs
                out["top_logprobs"] = [None if alts is None else {self.tokenizer.decode([t]): lp for t, lp in alts}
                                       for alts in tops]
        return out


class Stream:
    """The text of a `stream` / `stream_chat` call as it is generated: iterating yields one string per
    prompt, its new text ('' where none), whenever some prompt has new text. Closing the stream, or
    dropping it, cancels what is still running; their slots are freed at the next step."""

    def __init__(self, llama: Llama, requests: List[Request]):
        self._llama = llama
        self.requests = requests
        self._closed = False

    def __iter__(self) -> Iterator[List[str]]:
        return self

    def __next__(self) -> List[str]:
        if not self._closed:
            try:
                self._llama._wait(self.requests, text=True)
            except BaseException:
                self.close()
                raise
        with self._llama.engine.lock:
            pieces = [r.stream.pop() for r in self.requests]
        if any(pieces):
            return pieces
        self.close()
        raise StopIteration

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._llama.engine.cancel([r for r in self.requests if not r.done])

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Delta(NamedTuple):
    """What a completion added since the last one: text, and the tokens (with their log-probabilities and
    alternatives when asked for) that made it. Text lags its tokens where a character or a possible stop
    string is unfinished."""

    text: str
    tokens: List[int]
    logprobs: List[Optional[float]]
    top_logprobs: List[Optional[List[Tuple[int, float]]]] = []


class _Notifying(threading.Condition):
    """A request's waiter that also calls `on_change` whenever the engine notifies it (see Llama.submit)."""

    def __init__(self, lock, on_change: Callable[[], None]):
        super().__init__(lock)
        self._on_change = on_change

    def notify_all(self) -> None:
        super().notify_all()
        self._on_change()


class Completion:
    """One submitted prompt (`Llama.submit`): iterate for its Deltas as they are generated, or `wait`.
    Dropping it, or `cancel`, frees its slot at the next step."""

    def __init__(self, llama: Llama, request: Request):
        self._llama = llama
        self.request = request
        self._sent = 0  # tokens already handed out in a Delta

    @property
    def finish_reason(self) -> Optional[str]:
        """None while running; then "stop" (a stop token or string), "length" (max_gen_len or max_seq_len),
        "cancelled" or "error"."""
        return self.request.finish_reason

    @property
    def text(self) -> str:
        return self.request.stream.text

    @property
    def tokens(self) -> List[int]:
        return self.request.tokens

    @property
    def logprobs(self) -> List[Optional[float]]:
        return self.request.token_logprobs

    @property
    def prompt_tokens(self) -> List[int]:
        return self.request.prompt

    @property
    def prompt_logprobs(self) -> List[float]:
        """Of prompt tokens 1.., with logprobs and echo."""
        return self.request.prompt_logprobs

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose keys and values came from the prefix cache (known once it started)."""
        return self.request.cached_tokens

    @property
    def ttft(self) -> Optional[float]:
        """Seconds from submitting to the first token."""
        r = self.request
        return None if r.first_token_at is None else r.first_token_at - r.submitted_at

    def wait(self) -> "Completion":
        """Block until done; raise the request's error, if it failed."""
        self._llama._wait([self.request])
        return self

    def poll(self) -> Optional[Delta]:
        """What arrived since the last Delta, without waiting: None when nothing did. Once `finish_reason`
        is set, one more poll returns whatever is left."""
        r = self.request
        with self._llama.engine.lock:
            text, tokens = r.stream.pop(), r.tokens[self._sent :]
            logprobs, tops = r.token_logprobs[self._sent :], r.token_top_logprobs[self._sent :]
            self._sent = len(r.tokens)
        return Delta(text, tokens, logprobs, tops) if text or tokens else None

    def __iter__(self) -> Iterator[Delta]:
        r = self.request
        try:
            while True:
                self._llama._wait([r], text=True, more=lambda: len(r.tokens) > self._sent)
                delta = self.poll()
                if delta is not None:
                    yield delta
                elif r.done:
                    return
        finally:
            if not r.done:
                self.cancel()

    def cancel(self) -> None:
        self._llama.engine.cancel([self.request])

    def __del__(self) -> None:
        if not self.request.done:
            self.cancel()
