"""`Llama`: build a model from a checkpoint, then generate, stream, complete text, chat and score."""
from __future__ import annotations

import itertools
import logging
import math
from typing import (Collection, FrozenSet, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple,
                    TypedDict, Union)

import torch
import torch.nn.functional as F

from llama.chat_format import Dialog, Message, check_chat_format, check_chat_format_name, encode_dialog
from llama.distributed import env_world_size, on_every_rank, resolve_device, resolve_dtype
from llama.errors import LogitsError, check_positive_int
from llama.loading import load_model
from llama.model import Transformer
from llama.numerics import locate_nonfinite
from llama.quantize import check_mode
from llama.sampling import check_sampling, sample
from llama.text import TextStream, check_stop, decode_continuation
from llama.tokenizer import AnyTokenizer

log = logging.getLogger(__name__)



class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # present when logprobs=True
    logprobs: List[float]  # present when logprobs=True


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]
    logprobs: List[float]


class Score(NamedTuple):
    logprob: float  # summed log-probability of the continuation given the context
    is_greedy: bool  # every continuation token is the argmax given everything before it
    n_tokens: int  # continuation tokens scored


class _Row:
    """One prompt's generation: its new tokens (stop tokens excluded) and, when text is wanted,
    their TextStream."""

    def __init__(self, prompt: Sequence[int], max_new: int, stream: Optional[TextStream]):
        self.prompt = list(prompt)
        self.max_new = max_new
        self.stream = stream
        self.tokens: List[int] = []
        self.logprobs: List[float] = []
        self.prompt_logprobs: List[float] = []  # filled for echo with logprobs
        self.done = False
        if max_new == 0:
            self._end()

    def add(self, token: int, logprob: Optional[float], stop_ids: Collection[int]) -> None:
        if token in stop_ids:
            self._end()
            return
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if (self.stream is not None and self.stream.push(token)) or len(self.tokens) >= self.max_new:
            self._end()

    def _end(self) -> None:
        self.done = True
        if self.stream is not None:
            self.stream.finish()


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: Optional[str] = None,
        max_seq_len: int = 512,
        max_batch_size: int = 4,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        compile: bool = False,
        quantize: Optional[str] = None,
        lora: Optional[str] = None,
        chat_format: Optional[str] = None,
    ) -> "Llama":
        """Load a Meta-layout or Hugging Face checkpoint for this process's model-parallel rank.

        A checkpoint of S shards runs on M model-parallel processes when S % M == 0 or M % S == 0;
        each rank reads only its slices. `tokenizer_path` defaults to CKPT_DIR/tokenizer.model.
        Sets up torch.distributed and fairscale when they are not set up yet (nccl on CUDA,
        gloo on CPU; a plain `python` run is a world of one). Arguments are checked before that;
        files, which hosts may see differently, right after, and every rank agrees on the outcome
        before loading, so a bad input fails on every rank alike.

        `lora` is a PEFT LoRA adapter folder merged into the weights as they load (llama.lora).
        `chat_format` ('llama2', 'llama3' or 'alpaca'; default: the tokenizer's) is the prompt format
        of chat_completion, stream_chat and encode_dialog.
        """
        check_positive_int("max_seq_len", max_seq_len)
        check_positive_int("max_batch_size", max_batch_size)
        if not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an integer")
        mp_size = model_parallel_size or env_world_size()
        check_positive_int("model_parallel_size", mp_size)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        check_mode(quantize)
        check_chat_format_name(chat_format)

        model, tokenizer = load_model(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, mp_size, device, dtype,
                                      compile=compile, quantize=quantize, lora=lora)
        return Llama(model, tokenizer, seed=seed, chat_format=chat_format)


    def __init__(self, model: Transformer, tokenizer: AnyTokenizer, seed: int = 1, chat_format: Optional[str] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.chat_format = check_chat_format(chat_format, tokenizer)  # the name in use, default resolved
        self.device = model.tok_embeddings.weight.device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    @property
    def max_seq_len(self) -> int:
        return self.model.cache_shape[1]

    @property
    def max_batch_size(self) -> int:
        return self.model.cache_shape[0]

    def _check_tokens(self, what: str, tokens: Sequence[int]) -> None:
        if not isinstance(tokens, (list, tuple)) or not tokens:
            raise ValueError(f"{what} is empty: every prompt needs at least one token (e.g. BOS)")
        if len(tokens) > self.max_seq_len:
            raise ValueError(f"{what} has {len(tokens)} tokens, more than max_seq_len={self.max_seq_len}: "
                             "shorten it or build with a larger max_seq_len")
        vocab = self.model.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in tokens):
            raise ValueError(f"{what} holds token ids outside [0, {vocab})")

    def _check_prompts(self, prompt_tokens: Sequence[Sequence[int]]) -> None:
        if not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
            raise ValueError("prompt_tokens must be a non-empty list of token-id lists")
        if len(prompt_tokens) > self.max_batch_size:
            raise ValueError(f"{len(prompt_tokens)} prompts exceed max_batch_size={self.max_batch_size}: "
                             "pass fewer prompts per call or build with a larger max_batch_size")
        for i, p in enumerate(prompt_tokens):
            self._check_tokens(f"prompt {i}", p)

    def _start(
        self,
        prompt_tokens: List[List[int]],
        contexts: Iterable[Optional[List[int]]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        top_k: int,
        stop: Union[str, Sequence[str], None],
        stop_tokens: Optional[Collection[int]],
        logprobs: bool = False,
        echo: bool = False,
    ) -> Tuple[List[_Row], Iterator[None]]:
        """Check every argument (agreeing with the other ranks that they got the same, valid ones),
        then set up one row per prompt and the (not yet started) decoding loop. A row gets a
        TextStream decoding after its context, or none where the context is None."""

        def check() -> Tuple[List[str], List[int]]:
            check_sampling(temperature, top_p, top_k)
            if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 0:
                raise ValueError(f"max_gen_len={max_gen_len!r} must be an integer >= 0")
            self._check_prompts(prompt_tokens)
            extra = list(stop_tokens or [])
            if not all(isinstance(t, int) and 0 <= t < self.model.vocab_size for t in extra):
                raise ValueError(f"stop_tokens={stop_tokens!r} must be token ids in [0, {self.model.vocab_size})")
            return check_stop(stop), extra

        same = (prompt_tokens, max_gen_len, temperature, top_p, top_k, stop, stop_tokens, logprobs, echo)
        stops, extra = on_every_rank(check, same, what="prompts or sampling arguments")
        rows = [_Row(p, min(max_gen_len, self.max_seq_len - len(p)),
                     None if ctx is None else TextStream(self.tokenizer, ctx, stops))
                for p, ctx in zip(prompt_tokens, contexts)]
        stop_ids = self.tokenizer.stop_ids | frozenset(extra)
        return rows, self._decode(rows, temperature, top_p, top_k, stop_ids, logprobs, echo)

    @torch.inference_mode()
    def _decode(self, rows: List[_Row], temperature: float, top_p: float, top_k: int, stop_ids: FrozenSet[int],
                logprobs: bool, echo: bool) -> Iterator[None]:
        """Prefill every prompt in one forward pass, then decode each row at its own position,
        adding one token to every unfinished row per step and yielding after each step."""
        B = len(rows)
        lens = [len(r.prompt) for r in rows]
        prompt = torch.zeros((B, max(lens)), dtype=torch.long)  # right-padded; pads are never attended to
        for i, r in enumerate(rows):
            prompt[i, : lens[i]] = torch.tensor(r.prompt)
        prompt = prompt.to(self.device)
        last = torch.tensor(lens, device=self.device) - 1

        last_input: tuple = (prompt, 0)  # what produced `logits`, to re-run if they turn out non-finite
        h = self.model.hidden(prompt, 0)  # (B, T, dim)
        logits = self.model.logits(h[torch.arange(B, device=self.device), last])  # (B, vocab)
        if logprobs and echo:
            lp = F.log_softmax(self.model.logits(h[:, :-1]), dim=-1)  # (B, T-1, vocab)
            prompt_lp = lp.gather(-1, prompt[:, 1:, None]).squeeze(-1).tolist()  # (B, T-1)
            for i, r in enumerate(rows):
                r.prompt_logprobs = prompt_lp[i][: lens[i] - 1]
        del h

        # Rows that share every position (batch 1, prompts of one length) decode at an int position:
        # the cache write is then a slice, one query needs no mask, and the model's decode step can
        # skip the module machinery.
        pos = lens[0] if len(set(lens)) == 1 else last + 1  # where each row's next token goes
        decode = (self.model.decode_step() or self.model.hidden) if isinstance(pos, int) else None
        for step in range(max(r.max_new for r in rows)):
            # Logits holding NaN or +inf, or nothing above -inf, are exactly those whose max is not
            # finite (max propagates NaN). Sampling must not see them; a live row raises below.
            peak = logits.amax(-1)  # (B,)
            if temperature > 0:
                logits = logits.masked_fill(~peak.isfinite()[:, None], 0.0)
            next_token = sample(logits, temperature, top_p, top_k, self.generator)
            # One host sync per step, for tokens and peaks together (token ids are exact in float32).
            tokens, peaks = torch.stack([next_token.float(), peak.float()]).tolist()
            bad_row = next((i for i, (r, p) in enumerate(zip(rows, peaks)) if not (r.done or math.isfinite(p))), None)
            if bad_row is not None:
                where = locate_nonfinite(self.model, *last_input)
                raise LogitsError(f"row {bad_row} at generation step {step}: the model's logits are NaN, +inf or "
                                  "all -inf (overflow in the weights or dtype); try dtype='float32' or 'bf16'. "
                                  f"First non-finite output: {where or 'none in a module'}")
            token_lp = [None] * B
            if logprobs:
                token_lp = F.log_softmax(logits, dim=-1).gather(-1, next_token[:, None]).squeeze(-1).tolist()
            for r, t, lp in zip(rows, tokens, token_lp):
                if not r.done:
                    r.add(int(t), lp, stop_ids)
            yield
            if all(r.done for r in rows):
                return
            # Finished rows keep decoding (into their own cache rows) so the batch stays rectangular.
            if isinstance(pos, int):
                last_input = (next_token[:, None], pos)
                h = decode(*last_input)
            else:
                kv_len = min(max(lens) + step + 1, self.max_seq_len)
                last_input = (next_token[:, None], pos.clamp(max=self.max_seq_len - 1))
                h = self.model.hidden(*last_input, kv_len=kv_len)
            logits = self.model.logits(h[:, -1])
            pos = pos + 1

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
        stop: Union[str, Sequence[str], None] = None,
        stop_tokens: Optional[Collection[int]] = None,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt until a stop token, a stop string, or `max_gen_len` new tokens (or
        the end of max_seq_len).

        All prompts are prefilled in one forward pass; each row then decodes at its own position.
        Stop tokens are the tokenizer's (EOS; for Llama 3 also <|eot_id|> and <|eom_id|>) plus
        `stop_tokens`; they are not returned. A row that meets a `stop` string ends with the token
        that completed it. Returns the new tokens per row (the prompt too with `echo`) and, with
        `logprobs`, each returned token's log-probability (0.0 for the first prompt token).
        """
        contexts = prompt_tokens if stop else itertools.repeat(None)  # stop strings need the text
        rows, steps = self._start(prompt_tokens, contexts, max_gen_len, temperature, top_p, top_k, stop,
                                  stop_tokens, logprobs, echo)
        for _ in steps:
            pass
        tokens = [(r.prompt if echo else []) + r.tokens for r in rows]
        if not logprobs:
            return tokens, None
        return tokens, [([0.0] + r.prompt_logprobs if echo else []) + r.logprobs for r in rows]

    def _encode_prompts(self, prompts: List[str]) -> List[List[int]]:
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError("prompts must be a list of strings")
        return [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]

    def _encode_dialogs(self, dialogs: List[Dialog]) -> List[List[int]]:
        if not isinstance(dialogs, (list, tuple)):
            raise TypeError("dialogs must be a list of dialogs (lists of messages)")
        return [self.encode_dialog(d) for d in dialogs]

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
        stop: Union[str, Sequence[str], None] = None,
        stop_tokens: Optional[Collection[int]] = None,
    ) -> List[CompletionPrediction]:
        """Complete each prompt; the text ends before the first `stop` string, if any appears."""
        prompt_tokens = self._encode_prompts(prompts)
        rows, steps = self._start(prompt_tokens, prompt_tokens, self._gen_len(max_gen_len), temperature, top_p,
                                  top_k, stop, stop_tokens, logprobs, echo)
        for _ in steps:
            pass
        return [self._prediction(r, logprobs, echo) for r in rows]

    def stream(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        *,
        top_k: int = 0,
        stop: Union[str, Sequence[str], None] = None,
        stop_tokens: Optional[Collection[int]] = None,
    ) -> Iterator[List[str]]:
        """`text_completion` as it happens: yields, after each decoding step that adds text, one
        string per prompt with its new text ('' where none). Each prompt's pieces join up to its
        `text_completion` generation exactly. Arguments are checked before this returns."""
        prompt_tokens = self._encode_prompts(prompts)
        rows, steps = self._start(prompt_tokens, prompt_tokens, self._gen_len(max_gen_len), temperature, top_p,
                                  top_k, stop, stop_tokens)
        return _pieces(rows, steps)

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        *,
        top_k: int = 0,
        stop: Union[str, Sequence[str], None] = None,
        stop_tokens: Optional[Collection[int]] = None,
    ) -> List[ChatPrediction]:
        """Answer each dialog as the assistant, in `self.chat_format` (by default the tokenizer's: Llama 2's
        `[INST]` for SentencePiece, Llama 3's headers and <|eot_id|> for tiktoken)."""
        prompt_tokens = self._encode_dialogs(dialogs)
        rows, steps = self._start(prompt_tokens, [[]] * len(prompt_tokens), self._gen_len(max_gen_len),
                                  temperature, top_p, top_k, stop, stop_tokens, logprobs)
        for _ in steps:
            pass
        return [self._prediction(r, logprobs, False, role="assistant") for r in rows]

    def stream_chat(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        *,
        top_k: int = 0,
        stop: Union[str, Sequence[str], None] = None,
        stop_tokens: Optional[Collection[int]] = None,
    ) -> Iterator[List[str]]:
        """`chat_completion` as it happens, yielding like `stream`."""
        prompt_tokens = self._encode_dialogs(dialogs)
        rows, steps = self._start(prompt_tokens, [[]] * len(prompt_tokens), self._gen_len(max_gen_len),
                                  temperature, top_p, top_k, stop, stop_tokens)
        return _pieces(rows, steps)

    def _gen_len(self, max_gen_len: Optional[int]) -> int:
        return self.max_seq_len - 1 if max_gen_len is None else max_gen_len

    def _prediction(self, row: _Row, logprobs: bool, echo: bool, role: Optional[str] = None) -> dict:
        text = row.stream.text
        if echo:
            text = self.tokenizer.decode(row.prompt) + text
        out = {"generation": text if role is None else {"role": role, "content": text}}
        if logprobs:
            tokens = (row.prompt if echo else []) + row.tokens
            out["tokens"] = [self.tokenizer.decode([t]) for t in tokens]
            out["logprobs"] = ([0.0] + row.prompt_logprobs if echo else []) + row.logprobs
        return out

    def decode_continuation(self, context: List[int], tokens: List[int]) -> str:
        """The text `tokens` add after `context` (see the module function)."""
        return decode_continuation(self.tokenizer, context, tokens)

    def encode_dialog(self, dialog: Dialog) -> List[int]:
        """The chat prompt tokens for `dialog` in `self.chat_format`."""
        return encode_dialog(self.tokenizer, dialog, self.chat_format)

    @torch.inference_mode()
    def score_tokens(self, pairs: Sequence[Tuple[Sequence[int], Sequence[int]]]) -> List[Score]:
        """For each (context, continuation) pair of token lists: the continuation's summed
        log-probability given the context, and whether greedy decoding would produce it.

        One forward pass per `max_batch_size` pairs. Under model parallelism every rank holds the
        same gathered logits, so every rank returns the same scores.
        """
        seqs, starts = on_every_rank(lambda: self._check_pairs(pairs), same=pairs, what="pairs")
        scores: List[Score] = []
        for b in range(0, len(seqs), self.max_batch_size):
            scores += self._score_batch(seqs[b : b + self.max_batch_size], starts[b : b + self.max_batch_size])
        return scores

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
            self._check_tokens(f"pair {i} (context + continuation)", context + continuation)
            seqs.append(context + continuation)
            starts.append(len(context))
        return seqs, starts

    def _score_batch(self, seqs: List[List[int]], starts: List[int]) -> List[Score]:
        B, T = len(seqs), max(len(s) for s in seqs)
        tokens = torch.zeros((B, T), dtype=torch.long)  # right-padded; causal attention never sees the pads
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = torch.tensor(s)
        tokens = tokens.to(self.device)
        h = self.model.hidden(tokens, 0)  # (B, T, dim)
        # Position t predicts token t + 1: gather the predicting positions of every continuation.
        rows = torch.cat([torch.full((len(s) - n,), i) for i, (s, n) in enumerate(zip(seqs, starts))])
        cols = torch.cat([torch.arange(n - 1, len(s) - 1) for s, n in zip(seqs, starts)])
        rows, cols = rows.to(self.device), cols.to(self.device)
        targets = tokens[rows, cols + 1]  # (N,)
        logprobs, greedy = [], []
        for hs, tg in zip(h[rows, cols].split(1024), targets.split(1024)):  # bounds the (n, vocab) logits
            logits = self.model.logits(hs)  # (n, vocab)
            logprobs.append(F.log_softmax(logits, dim=-1).gather(-1, tg[:, None]).squeeze(-1))
            greedy.append(logits.argmax(-1) == tg)
        sizes = [len(s) - n for s, n in zip(seqs, starts)]
        lp_rows = torch.cat(logprobs).double().split(sizes)
        greedy_rows = torch.cat(greedy).split(sizes)
        return [Score(float(lp.sum()), bool(g.all()), n) for lp, g, n in zip(lp_rows, greedy_rows, sizes)]

    def score(self, pairs: Sequence[Tuple[str, str]]) -> List[Score]:
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
        return self.score_tokens(token_pairs)

    def perplexity(self, texts: Sequence[str]) -> List[float]:
        """Per-text perplexity: exp of the mean negative log-probability of its tokens after BOS."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError("texts must be a list of strings")
        pairs = [([self.tokenizer.bos_id], self.tokenizer.encode(t, bos=False, eos=False)) for t in texts]
        return [math.exp(-s.logprob / s.n_tokens) for s in self.score_tokens(pairs)]


def _pieces(rows: List[_Row], steps: Iterator[None]) -> Iterator[List[str]]:
    for _ in steps:
        pieces = [r.stream.pop() for r in rows]
        if any(pieces):
            yield pieces
