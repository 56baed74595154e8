"""Text from tokens as they arrive: incremental detokenizing and stop strings."""
from __future__ import annotations

from typing import List, Sequence, Union

from llama.tokenizer import AnyTokenizer

# Tokens of context kept to decode the next piece of a stream: enough for SentencePiece to
# keep the piece's leading space; the full history is never re-decoded.
_STREAM_CONTEXT = 16


def check_stop(stop: Union[str, Sequence[str], None]) -> List[str]:
    """`stop` as a list of non-empty strings."""
    if stop is not None and not isinstance(stop, (str, list, tuple)):
        raise ValueError(f"stop={stop!r} must be a non-empty string or a list of them")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop={stop!r} must be a non-empty string or a list of them")
    return stops


def decode_continuation(tokenizer: AnyTokenizer, context: Sequence[int], tokens: Sequence[int]) -> str:
    """The text `tokens` add after `context`, keeping the leading space SentencePiece drops when a
    piece is decoded on its own."""
    if not context:
        return tokenizer.decode(tokens)
    before = tokenizer.decode(context)
    full = tokenizer.decode(list(context) + list(tokens))
    return full[len(before):] if full.startswith(before) else tokenizer.decode(tokens)


class TextStream:
    """The text of tokens generated after `context`, built one token at a time and cut before
    the first stop string.

    Streaming, stop strings and the final text all read it from here, so the streamed pieces add
    up to the final text exactly. A piece is settled only once it ends in a whole character (a
    multi-byte character may arrive as several byte tokens), and `pop` holds back any tail that
    could still grow into a stop string.
    """

    def __init__(self, tokenizer: AnyTokenizer, context: Sequence[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.context = list(context)[-_STREAM_CONTEXT:]
        self.pending: List[int] = []  # tokens whose text may still end in half a character
        self.text = ""  # settled text, cut before a stop string once one appears
        self.sent = 0  # characters of `text` already handed out by pop()
        self.stopped = False  # a stop string appeared
        self.finished = False  # no more tokens will come

    def push(self, token: int) -> bool:
        """Add a token; True once a stop string has appeared."""
        self.pending.append(token)
        piece = decode_continuation(self.tokenizer, self.context, self.pending)
        if not piece.endswith("\ufffd"):
            self._settle(piece)
        return self.stopped

    def finish(self) -> None:
        """No more tokens: settle the pending ones, even if they end in a broken character."""
        if self.pending and not self.stopped:
            self._settle(decode_continuation(self.tokenizer, self.context, self.pending))
        self.finished = True

    def _settle(self, piece: str) -> None:
        self.context = (self.context + self.pending)[-_STREAM_CONTEXT:]
        self.pending = []
        start = max(0, len(self.text) - self.longest_stop + 1)  # a stop string may straddle old and new text
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def pop(self) -> str:
        """Text settled since the last pop, up to where no stop string could still begin."""
        end = self._releasable()
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece

    def ready(self) -> bool:
        """Whether `pop` would return text."""
        return self._releasable() > self.sent

    def _releasable(self) -> int:
        return len(self.text) if self.stopped or self.finished else len(self.text) - self._stop_prefix()

    def _stop_prefix(self) -> int:
        """The length of the longest tail of `text` that begins some stop string."""
        for k in range(min(len(self.text), self.longest_stop - 1), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stop):
                return k
        return 0
