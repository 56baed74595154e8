"""Constrained decoding: the tokens a row may take next so that its text keeps matching a JSON
Schema, any JSON object, a regular expression or a Lark/GBNF grammar, on llguidance (a grammar
library made for this: an Earley parser over the tokenizer's token trie, a token bitmask per step).

`Grammars` belongs to one tokenizer: `check` compiles a constraint when a request is submitted (a
bad schema is refused then, naming the problem), `matcher` makes the per-row state the runner keeps,
`fill` computes the rows' bitmasks for one step and `apply` masks their logits with them.
"""
from __future__ import annotations

import functools
import json
from typing import List, Optional, Tuple

import torch

from llama.sampling import Constraint
from llama.tokenizer import AnyTokenizer


def _llguidance():
    try:
        import llguidance
        import llguidance.torch  # noqa: F401 - the bitmask helpers
    except ImportError:
        raise ValueError("structured output needs llguidance: pip install llguidance (or the 'serve' extra)") from None
    return llguidance


class _Vocabulary:
    """What llguidance reads of a tokenizer: each token's bytes, the special ones, BOS/EOS, and encoding."""

    def __init__(self, tokenizer: AnyTokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        # the model may have more rows than the tokenizer has tokens: those stand for no text
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.n_words)]
        self.tokens += [b""] * (vocab_size - len(self.tokens))
        self.special_token_ids = sorted(tokenizer.special_ids)
        self.is_tokenizer_wrapper = True
        # SentencePiece puts a space before the text it encodes (its dummy prefix), which a continuation
        # has not: such text is encoded after a newline, where that stays a token of its own, then cut
        # off; where it does not (a normalizer that folds whitespace), matched greedily against the vocabulary.
        x = tokenizer.encode("x", bos=False, eos=False)
        self._prefixed = tokenizer.token_bytes(x[0]).startswith(b" ")
        newline = tokenizer.encode("\n", bos=False, eos=False)
        self._marker = newline if b"".join(map(tokenizer.token_bytes, newline)).endswith(b"\n") else None
        self._ids = {t: i for i, t in reversed(list(enumerate(self.tokens))) if t and i not in tokenizer.special_ids}
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, text) -> List[int]:
        data = text if isinstance(text, bytes) else text.encode()
        if not self._prefixed:
            return self._tokenizer.encode(data.decode("utf-8", errors="replace"), bos=False, eos=False)
        if self._marker is not None:
            ids = self._tokenizer.encode("\n" + data.decode("utf-8", errors="replace"), bos=False, eos=False)
            if ids[: len(self._marker)] == self._marker:
                return ids[len(self._marker):]
        return self._greedy(data)

    def _greedy(self, data: bytes) -> List[int]:
        """The longest known token at each point (not what BPE would choose, but the same bytes)."""
        ids, i = [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                if data[i : i + n] in self._ids:
                    ids.append(self._ids[data[i : i + n]])
                    i += n
                    break
            else:
                i += 1  # a byte no token holds: left out
        return ids


class Grammars:
    def __init__(self, tokenizer: AnyTokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size

    @functools.cached_property
    def _ll_tokenizer(self):
        llg = _llguidance()
        vocabulary = _Vocabulary(self.tokenizer, self.vocab_size)
        return llg.LLTokenizer(vocabulary, n_vocab=self.vocab_size, eos_token=sorted(self.tokenizer.stop_ids))

    def check(self, constraint: Constraint) -> None:
        """Compile `constraint` for this tokenizer: a ValueError that names the problem if it cannot be."""
        error = _llguidance().LLMatcher.validate_grammar(_grammar(constraint), self._ll_tokenizer)
        if error:
            raise ValueError(f"the {constraint.kind} cannot be used: {error}")

    def matcher(self, constraint: Constraint):
        """A fresh parser state for one row."""
        llg = _llguidance()
        return llg.LLMatcher(self._ll_tokenizer, _grammar(constraint), log_level=0)

    def fill(self, matchers: list) -> Tuple[torch.Tensor, Optional[str]]:
        """The next-token bitmask of each matcher's row (int32, (rows, ceil(V / 32))), and an error if a
        matcher is stuck (its grammar allows nothing more). Runs beside the model's forward (Runner)."""
        llg = _llguidance()
        bitmask = llg.torch.allocate_token_bitmask(len(matchers), self.vocab_size)
        for k, m in enumerate(matchers):
            llg.torch.fill_next_token_bitmask(m, bitmask, k)
            if m.is_error():
                return bitmask, m.get_error()
        return bitmask, None

    def apply(self, logits: torch.Tensor, rows: List[int], bitmask: torch.Tensor) -> None:
        """Set to -inf, in place, the logits (R, V) of rows `rows` at every token their bitmask rows refuse."""
        index = torch.tensor(rows, device=logits.device)
        part = logits[index]
        _llguidance().torch.apply_token_bitmask_inplace(part, bitmask.to(logits.device))
        logits[index] = part


# JSON on one line, as OpenAI's structured outputs read: whitespace between tokens only as ", " and ": "
# (any whitespace would let a model ramble in it until max_tokens).
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@functools.lru_cache(maxsize=64)
def _grammar(constraint: Constraint) -> str:
    """llguidance's grammar for a constraint (the same schemas come again and again: cached)."""
    llg = _llguidance()
    if constraint.kind in ("json_object", "json_schema"):
        try:
            schema = json.loads(constraint.spec) if constraint.kind == "json_schema" else {"type": "object"}
        except ValueError as e:
            raise ValueError(f"the json_schema is not valid JSON: {e}") from None
        if isinstance(schema, dict):
            schema = {"x-guidance": _JSON_LAYOUT, **schema}
        try:
            return llg.grammar_from("json_schema", json.dumps(schema))
        except ValueError as e:
            raise ValueError(f"the json_schema cannot be used: {e}") from None
    try:
        return llg.grammar_from(constraint.kind, constraint.spec)
    except ValueError as e:
        raise ValueError(f"the {constraint.kind} cannot be used: {e}") from None
