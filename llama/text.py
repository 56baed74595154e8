"""Text from tokens as they arrive: incremental detokenizing and stop strings."""
from __future__ import annotations

from collections import deque
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple, Union

from llama.tokenizer import AnyTokenizer

# Tokens of context kept to decode the next piece of a stream: enough for SentencePiece to
# keep the piece's leading space; the full history is never re-decoded.
_STREAM_CONTEXT = 16
# Stop strings per request, and characters per stop string (OpenAI allows 4 stop strings).
MAX_STOPS = 16
MAX_STOP_CHARS = 256


def check_stop(stop: Union[str, Sequence[str], None]) -> List[str]:
    """`stop` as a list of at most MAX_STOPS non-empty strings of at most MAX_STOP_CHARS characters."""
    if stop is not None and not isinstance(stop, (str, list, tuple)):
        raise ValueError(f"stop={_short(stop)} must be a non-empty string or a list of them")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise ValueError(f"stop holds {len(stops)} strings: at most {MAX_STOPS} stop strings are allowed; send fewer")
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop={_short(stop)} must be a non-empty string or a list of them")
    for i, s in enumerate(stops):
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"stop[{i}] is {len(s)} characters long: a stop string may have at most "
                             f"{MAX_STOP_CHARS}; shorten it")
    return stops


def _short(value: object, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters: an error message never echoes a whole request."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class StopMatcher:
    """The stop strings as one Aho-Corasick automaton: fed the text a character at a time, it knows at
    once whether a stop string ends at that character (`ends`), and how long the longest tail of the
    text is that could still grow into one (`depth`), whatever the number of stop strings.

    States are the prefixes of the stop strings (a trie); `fail` links each to its longest proper
    suffix that is also a prefix, so a step follows at most as many links as earlier steps went deep:
    amortized, a constant number of operations per character.
    """

    def __init__(self, stops: Sequence[str]):
        self.goto: Dict[Tuple[int, str], int] = {}  # (state, character) -> the next state along the trie
        self.depth: List[int] = [0]  # the length of the prefix a state stands for
        self.ends: List[int] = [0]  # the length of the longest stop string ending at a state (0: none)
        children: List[List[Tuple[str, int]]] = [[]]
        for s in stops:
            state = 0
            for ch in s:
                nxt = self.goto.get((state, ch))
                if nxt is None:
                    nxt = self.goto[state, ch] = len(self.depth)
                    self.depth.append(self.depth[state] + 1)
                    self.ends.append(0)
                    children[state].append((ch, nxt))
                    children.append([])
                state = nxt
            self.ends[state] = len(s)
        self.fail = [0] * len(self.depth)
        queue = deque(nxt for _, nxt in children[0])  # breadth first: a state's fail link is shallower than itself
        while queue:
            state = queue.popleft()
            for ch, nxt in children[state]:
                self.fail[nxt] = self.step(self.fail[state], ch)
                self.ends[nxt] = self.ends[nxt] or self.ends[self.fail[nxt]]
                queue.append(nxt)

    def step(self, state: int, ch: str) -> int:
        """The state after reading `ch` in `state`."""
        goto = self.goto
        while state and (state, ch) not in goto:
            state = self.fail[state]
        return goto.get((state, ch), 0)


@lru_cache(maxsize=32)
def stop_matcher(stops: Tuple[str, ...]) -> StopMatcher:
    """One automaton per set of stop strings, never changed: the n choices of a request share theirs, and
    the call that checks the stop strings builds it, so that the engine's lock never waits for a build."""
    return StopMatcher(stops)


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
    could still grow into a stop string. Without stop strings nothing needs the text as each token
    arrives: tokens wait, and are decoded together when the text is read (a stream reads it every
    few tokens, a whole completion once), not once per token in the engine's step.
    """

    def __init__(self, tokenizer: AnyTokenizer, context: Sequence[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.matcher = stop_matcher(tuple(self.stop)) if self.stop else None
        self.state = 0  # the matcher's state after the settled text
        self.context = list(context)[-_STREAM_CONTEXT:]
        self.pending: List[int] = []  # tokens whose text may still end in half a character, or not yet read
        self.settled = ""  # settled text, cut before a stop string once one appears
        self.sent = 0  # characters of `text` already handed out by pop()
        self.stopped = False  # a stop string appeared
        self.finished = False  # no more tokens will come

    def push(self, token: int) -> bool:
        """Add a token; True once a stop string has appeared."""
        self.pending.append(token)
        if self.matcher is not None:
            self._catch_up()
        return self.stopped

    def finish(self) -> None:
        """No more tokens: settle the pending ones, even if they end in a broken character."""
        if self.pending and not self.stopped:
            self._settle(decode_continuation(self.tokenizer, self.context, self.pending))
        self.finished = True

    @property
    def text(self) -> str:
        """The text so far, settled: cut before a stop string, and short of a half-arrived character."""
        self._catch_up()
        return self.settled

    def _catch_up(self) -> None:
        """Settle the pending tokens unless their text ends in half a character."""
        if self.pending and not self.stopped:
            piece = decode_continuation(self.tokenizer, self.context, self.pending)
            if not piece.endswith("\ufffd"):
                self._settle(piece)

    def _settle(self, piece: str) -> None:
        self.context = (self.context + self.pending)[-_STREAM_CONTEXT:]
        self.pending = []
        start = len(self.settled)
        self.settled += piece
        if self.matcher is None:
            return
        cut, state, ends, step = None, self.state, self.matcher.ends, self.matcher.step
        for i, ch in enumerate(piece, start + 1):  # i: the length of the text up to and including ch
            state = step(state, ch)
            if ends[state] and (cut is None or i - ends[state] < cut):
                cut = i - ends[state]  # the earliest start of a stop string ending in this piece
        self.state = state
        if cut is not None:
            self.settled = self.settled[:cut]
            self.stopped = True

    def pop(self) -> str:
        """Text settled since the last pop, up to where no stop string could still begin."""
        end = self._releasable()
        piece = self.settled[self.sent : end]
        self.sent = max(self.sent, end)
        return piece

    def ready(self) -> bool:
        """Whether `pop` would return text."""
        return self._releasable() > self.sent

    def _releasable(self) -> int:
        self._catch_up()
        if self.stopped or self.finished or self.matcher is None:
            return len(self.settled)
        return len(self.settled) - self.matcher.depth[self.state]  # the tail that could still become a stop string
