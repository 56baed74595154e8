"""Chat prompt formats: Llama 2's [INST] turns, Llama 3's role headers and Alpaca's instructions.

A format is chosen by name (`CHAT_FORMATS`); by default the tokenizer's family decides
(`default_chat_format`): SentencePiece models speak Llama 2, tiktoken ones Llama 3. Alpaca is
only ever chosen by name, for models fine-tuned on Alpaca-format data (with either tokenizer).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple, TypedDict

from llama.tokenizer import AnyTokenizer, Llama3Tokenizer

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = List[Message]

# Llama 2 chat format.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
_LLAMA2_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")

# Alpaca: Stanford Alpaca's two prompt templates, each ending in an open response line.
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                       "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
_ALPACA_TAGS = ("### Instruction:", "### Input:", "### Response:")


def default_chat_format(tokenizer: AnyTokenizer) -> str:
    return tokenizer.default_chat_format


def check_chat_format_name(chat_format: Optional[str]) -> None:
    """Refuse a `chat_format` that names no format (None, the tokenizer's default, passes)."""
    if chat_format is not None and chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format={chat_format!r} is not one of {sorted(CHAT_FORMATS)}")


def check_chat_format(chat_format: Optional[str], tokenizer: AnyTokenizer) -> str:
    """`chat_format` (default: the tokenizer's), refused when unknown or when the tokenizer lacks its tokens."""
    check_chat_format_name(chat_format)
    name = default_chat_format(tokenizer) if chat_format is None else chat_format
    if name == "llama3" and getattr(tokenizer, "start_header_id", None) is None:
        raise ValueError("chat_format='llama3' needs Llama 3's tiktoken tokenizer (its header tokens); this "
                         "checkpoint has a SentencePiece one: use 'llama2' or leave chat_format unset")
    return name


def reserved_tags(tokenizer: AnyTokenizer, chat_format: Optional[str] = None) -> Tuple[str, ...]:
    """Text a dialog message may not contain in the chat format."""
    name = check_chat_format(chat_format, tokenizer)
    if name == "llama3":
        return tuple(tokenizer.special_tokens)
    if name == "alpaca":
        return _ALPACA_TAGS
    return _LLAMA2_TAGS


def strip_reserved_tags(tokenizer: AnyTokenizer, text: str, chat_format: Optional[str] = None) -> str:
    """`text` without the chat format's reserved tags, e.g. a model's answer before it joins a history."""
    for tag in reserved_tags(tokenizer, chat_format):
        text = text.replace(tag, "")
    return text


def encode_dialog(tokenizer: AnyTokenizer, dialog: Dialog, chat_format: Optional[str] = None) -> List[int]:
    """The prompt tokens asking the assistant to answer `dialog`, in `chat_format` (default: the tokenizer's)."""
    name = check_chat_format(chat_format, tokenizer)
    check_dialog(dialog, reserved_tags(tokenizer, name))
    return CHAT_FORMATS[name](tokenizer, dialog)


def _encode_llama2_dialog(tok: AnyTokenizer, dialog: Dialog) -> List[int]:
    """Llama 2: a system message folds into the first user turn; each finished (user, assistant)
    exchange is wrapped in BOS ... EOS; the last user turn is left open."""
    if dialog[0]["role"] == "system":
        first = {"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
        dialog = [first] + list(dialog[2:])
    tokens: List[int] = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
        tokens += tok.encode(text, bos=True, eos=True)
    tokens += tok.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens


def _encode_llama3_dialog(tok: Llama3Tokenizer, dialog: Dialog) -> List[int]:
    """Llama 3: <|begin_of_text|>, then each message as a role header, its content and <|eot_id|>;
    an open assistant header ends the prompt."""
    tokens = [tok.bos_id]
    for m in dialog:
        tokens += _llama3_header(tok, m["role"]) + tok.encode(m["content"].strip(), bos=False, eos=False)
        tokens.append(tok.eot_id)
    return tokens + _llama3_header(tok, "assistant")


def _llama3_header(tok: Llama3Tokenizer, role: str) -> List[int]:
    role_ids = tok.encode(role, bos=False, eos=False)
    return [tok.start_header_id] + role_ids + [tok.end_header_id] + tok.encode("\n\n", bos=False, eos=False)


def _encode_alpaca_dialog(tok: AnyTokenizer, dialog: Dialog) -> List[int]:
    """Alpaca: each user message is an instruction, and a system message is the input paired with
    every one of them (the template "with input"). Each finished (instruction, response) exchange
    is a whole Alpaca example, BOS + prompt + response + EOS, as the model was trained on; the last
    instruction's prompt is left open after "### Response:\n"."""
    has_system = dialog[0]["role"] == "system"
    system = dialog[0]["content"].strip() if has_system else ""
    turns = dialog[1:] if has_system else dialog

    def prompt(instruction: str) -> str:
        if not system:  # as Stanford Alpaca's data: an empty input takes the template without one
            return ALPACA_PROMPT.format(instruction=instruction.strip())
        return ALPACA_PROMPT_INPUT.format(instruction=instruction.strip(), input=system)

    tokens: List[int] = []
    for user, answer in zip(turns[::2], turns[1::2]):
        tokens += tok.encode(prompt(user["content"]) + answer["content"].strip(), bos=True, eos=True)
    return tokens + tok.encode(prompt(turns[-1]["content"]), bos=True, eos=False)


CHAT_FORMATS: Dict[str, Callable[[AnyTokenizer, Dialog], List[int]]] = {
    "llama2": _encode_llama2_dialog,
    "llama3": _encode_llama3_dialog,
    "alpaca": _encode_alpaca_dialog,
}


def check_dialog(dialog: Dialog, reserved: Sequence[str]) -> None:
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError("a dialog must be a non-empty list of {'role', 'content'} messages")
    for i, m in enumerate(dialog):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise ValueError(f"message {i} must be {{'role': 'system'|'user'|'assistant', 'content': str}}")
        tag = next((t for t in reserved if t in m["content"]), None)
        if tag is not None:
            raise ValueError(f"message {i} contains the reserved chat tag {tag!r}: remove it")
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    expected = ["user", "assistant"] * len(turns)
    if not turns or [m["role"] for m in turns] != expected[: len(turns)] or turns[-1]["role"] != "user":
        raise ValueError("after an optional system message, roles must alternate user/assistant/... "
                         "and end with the user")
