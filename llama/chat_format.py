"""Chat prompt formats: Llama 2's [INST] turns, Llama 3's role headers (with Llama 3.1's tool calls)
and Alpaca's instructions.

A format is chosen by name (`CHAT_FORMATS`); by default the tokenizer's family decides
(`default_chat_format`): SentencePiece models speak Llama 2, tiktoken ones Llama 3. Alpaca is
only ever chosen by name, for models fine-tuned on Alpaca-format data (with either tokenizer).

Tools (OpenAI's `{"type": "function", "function": {"name", "description", "parameters"}}`) follow
Meta's Llama 3.1 JSON tool calling: "Environment: ipython" and the knowledge dates open the system
message, the tool definitions and the instruction to answer with {"name": ..., "parameters": ...}
open the first user message, an assistant's tool call is that JSON, and a tool's result is an
`ipython` message. Llama 2 and Alpaca have no tool format.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, TypedDict

from llama.tokenizer import AnyTokenizer, Llama3Tokenizer

Role = Literal["system", "user", "assistant", "tool"]


class Message(TypedDict, total=False):
    role: Role
    content: Optional[str]  # None for an assistant message that only calls tools
    tool_calls: List[dict]  # an assistant's: [{"id", "type": "function", "function": {"name", "arguments"}}]
    tool_call_id: str  # a tool's: the call it answers


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

# Llama 3.1 JSON tool calling (Meta's prompt format; the date is the one of Hugging Face's template).
TOOL_SYSTEM_HEAD = "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
TOOL_INSTRUCTION = ("Given the following functions, please respond with a JSON for a function call with its proper "
                    "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
                    "\"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n")
PYTHON_TAG = "<|python_tag|>"


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


def encode_dialog(tokenizer: AnyTokenizer, dialog: Dialog, chat_format: Optional[str] = None,
                  tools: Optional[List[dict]] = None) -> List[int]:
    """The prompt tokens asking the assistant to answer `dialog`, in `chat_format` (default: the tokenizer's),
    with `tools` it may call (OpenAI's tool definitions; Llama 3 only)."""
    name = check_chat_format(chat_format, tokenizer)
    if tools is not None or any(m.get("role") == "tool" or m.get("tool_calls") for m in dialog if isinstance(m, dict)):
        if name != "llama3":
            raise ValueError(f"the {name} chat format has no tool calls: tools need a Llama 3 tokenizer "
                             "(chat_format 'llama3')")
        check_tools(tools or [])
    check_dialog(dialog, reserved_tags(tokenizer, name))
    if name == "llama3":
        return _encode_llama3_dialog(tokenizer, dialog, tools)
    return CHAT_FORMATS[name](tokenizer, dialog)


def check_tools(tools: List[dict]) -> None:
    """OpenAI's tool definitions: {"type": "function", "function": {"name": str, "description"?, "parameters"?}}."""
    if not isinstance(tools, list):
        raise ValueError("tools must be a list of {'type': 'function', 'function': {...}} definitions")
    names = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(function, dict)
                and isinstance(function.get("name"), str) and function["name"]):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                             "'description': ..., 'parameters': {a JSON Schema}}}}")
        if not isinstance(function.get("parameters", {}), dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON Schema object")
        if function["name"] in names:
            raise ValueError(f"tools[{i}]: two tools are named {function['name']!r}")
        names.add(function["name"])


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


def _encode_llama3_dialog(tok: Llama3Tokenizer, dialog: Dialog, tools: Optional[List[dict]] = None) -> List[int]:
    """Llama 3: <|begin_of_text|>, then each message as a role header, its content and <|eot_id|>;
    an open assistant header ends the prompt. With tools, Llama 3.1's JSON tool calling (see the module)."""
    tokens = [tok.bos_id]
    messages = list(dialog)
    if tools is not None:
        system = messages.pop(0)["content"].strip() if messages[0]["role"] == "system" else ""
        tokens += _llama3_message(tok, "system", TOOL_SYSTEM_HEAD + system)
        first = messages.pop(0)
        definitions = "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in tools)
        tokens += _llama3_message(tok, "user", TOOL_INSTRUCTION + definitions + first["content"].strip())
    for m in messages:
        if m.get("tool_calls"):
            tokens += _llama3_message(tok, "assistant", "; ".join(map(tool_call_json, m["tool_calls"])))
        elif m["role"] == "tool":
            tokens += _llama3_message(tok, "ipython", m["content"])
        else:
            tokens += _llama3_message(tok, m["role"], m["content"].strip())
    return tokens + _llama3_header(tok, "assistant")


def _llama3_message(tok: Llama3Tokenizer, role: str, content: str) -> List[int]:
    return _llama3_header(tok, role) + tok.encode(content, bos=False, eos=False) + [tok.eot_id]


def tool_call_json(call: dict) -> str:
    """An OpenAI tool call as Llama 3.1 writes it: {"name": ..., "parameters": {...}}, the arguments as the
    client sent them (OpenAI's JSON text) or written as JSON (a mapping)."""
    function = call["function"]
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            if not isinstance(json.loads(arguments), dict):
                raise ValueError
        except ValueError:
            raise ValueError(f"the arguments of tool call {function['name']!r} must be a JSON object") from None
    else:
        arguments = json.dumps(arguments, ensure_ascii=False)
    return '{"name": ' + json.dumps(function["name"], ensure_ascii=False) + ', "parameters": ' + arguments + "}"


def parse_tool_calls(text: str, names: Sequence[str]) -> Optional[List[Tuple[str, str]]]:
    """The (name, JSON arguments) of the tool calls an answer makes, Llama 3.1's way ({"name": ...,
    "parameters": {...}}, several joined by ";", after an optional <|python_tag|>), or None if the answer is
    not wholly tool calls of tools named `names`."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            value, end = decoder.raw_decode(body, at)
        except ValueError:
            return None
        arguments = value.get("parameters", value.get("arguments")) if isinstance(value, dict) else None
        if not (isinstance(value, dict) and value.get("name") in names and isinstance(arguments, dict)):
            return None
        calls.append((value["name"], json.dumps(arguments)))
        at = end
        while at < len(body) and body[at] in " \t\n;":
            at += 1
    return calls or None


def tool_call_schema(tools: List[dict], name: Optional[str] = None) -> dict:
    """A JSON Schema of one Llama 3.1 tool call: of the tool `name`, or of any of `tools`."""
    def one(tool: dict) -> dict:
        function = tool["function"]
        return {"type": "object", "properties": {"name": {"const": function["name"]},
                                                 "parameters": function.get("parameters") or {"type": "object"}},
                "required": ["name", "parameters"], "additionalProperties": False}

    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    return one(chosen[0]) if len(chosen) == 1 else {"anyOf": [one(t) for t in chosen]}


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
        calls = isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls")
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool") or not (
                isinstance(m.get("content"), str) or (calls and m.get("content") is None)):
            raise ValueError(f"message {i} must be {{'role': 'system'|'user'|'assistant'|'tool', 'content': str}}")
        if calls and not (isinstance(calls, list) and all(
                isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
                for c in calls)):
            raise ValueError(f"message {i}: tool_calls must be [{{'function': {{'name': ..., 'arguments': ...}}}}]")
        tag = next((t for t in reserved if t in (m.get("content") or "")), None)
        if tag is not None:
            raise ValueError(f"message {i} contains the reserved chat tag {tag!r}: remove it")
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    # user and assistant alternate; an assistant's tool calls are followed by one or more tool results,
    # then an assistant again; the dialog ends where the assistant answers next
    expect = "user"
    for m in turns:
        role = m["role"]
        if expect == "results" and role == "tool":
            continue
        if role != expect and not (expect == "results" and role == "assistant"):
            if role == "tool" or expect == "tool":
                raise ValueError("a tool message must answer an assistant message's tool_calls, which must be "
                                 "followed by the tools' results (role 'tool')")
            raise ValueError("after an optional system message, roles must alternate user/assistant/... "
                             "and end with the user (or a tool's result)")
        expect = "user" if role == "tool" else ("assistant" if role == "user" else
                                                 ("tool" if m.get("tool_calls") else "user"))
        if role == "tool":
            expect = "results"
    if expect not in ("assistant", "results"):
        raise ValueError("after an optional system message, roles must alternate user/assistant/... "
                         "and end with the user (or a tool's result)")
