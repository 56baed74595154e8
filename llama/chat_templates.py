"""Jinja chat templates for Hugging Face's `apply_chat_template`, one per chat format of llama.chat_format.

Each renders the text whose tokens are `encode_dialog(tokenizer, dialog, name)`: the exported
tokenizer.json encodes each stretch between special tokens as its own SentencePiece call, and the
special tokens (`bos_token`, `eos_token`, Llama 3's headers) appear in the text as themselves.
A new chat format gets its template by adding an entry keyed by its CHAT_FORMATS name.
"""
from __future__ import annotations

from typing import Dict

from llama.chat_format import ALPACA_PROMPT, ALPACA_PROMPT_INPUT, TOOL_INSTRUCTION, TOOL_SYSTEM_HEAD

# Llama 2: a system message folds into the first user turn; a finished exchange is
# <s>[INST] user [/INST] answer </s>; the prompt ends with the last user turn's [/INST].
_LLAMA2 = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages | length < 2 or messages[1]['role'] != 'user' -%}"
    "{{- raise_exception('a system message must be followed by a user message') -}}"
    "{%- endif -%}"
    "{%- set turns = [{'role': 'user', 'content': '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n'"
    " + messages[1]['content']}] + messages[2:] -%}"
    "{%- else -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) or message['role'] not in ['user', 'assistant'] -%}"
    "{{- raise_exception('after an optional system message, roles must alternate user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- ' ' + message['content'] | trim + ' ' + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

def _literal(text: str) -> str:
    """`text` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# Llama 3: <|begin_of_text|>, each message as a role header, its content and <|eot_id|>; the
# generation prompt is an open assistant header. With `tools`, Llama 3.1's JSON tool calling: the
# ipython environment in the system message, the definitions in the first user message, a tool call
# as {"name": ..., "parameters": ...}, a tool's result as an ipython message.
_LLAMA3 = (
    "{{- bos_token -}}"
    "{%- if tools is defined and tools is not none -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] | trim -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "{%- if not messages -%}{{- raise_exception('tools need a first user message to go in') -}}{%- endif -%}"
    f"{{{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + {_literal(TOOL_SYSTEM_HEAD)} + system"
    " + '<|eot_id|>' -}}"
    f"{{{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' + {_literal(TOOL_INSTRUCTION)} -}}}}"
    "{%- for tool in tools -%}{{- tool | tojson(indent=4) + '\\n\\n' -}}{%- endfor -%}"
    "{{- messages[0]['content'] | trim + '<|eot_id|>' -}}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- if not loop.first -%}{{- '; ' -}}{%- endif -%}"
    "{%- set arguments = call['function']['arguments'] -%}"
    "{{- '{\"name\": ' + call['function']['name'] | tojson + ', \"parameters\": ' -}}"
    "{{- (arguments if arguments is string else arguments | tojson) + '}' -}}"
    "{%- endfor -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' -}}"
    "{%- else -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# Alpaca: a system message is the input of every instruction (the template with an input; an empty
# one takes the template without); a user message opens BOS + prompt, an answer closes it with EOS,
# so a finished exchange is one whole example. Built from chat_format's templates, so the two
# cannot drift apart.
_PLAIN_HEAD, _PLAIN_TAIL = ALPACA_PROMPT.split("{instruction}")
_INPUT_HEAD, _rest = ALPACA_PROMPT_INPUT.split("{instruction}")
_INPUT_MID, _INPUT_TAIL = _rest.split("{input}")
_ALPACA = (
    "{%- set has_system = messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] | trim if has_system else '' -%}"
    "{%- set turns = messages[1:] if has_system else messages -%}"
    "{%- if not turns -%}{{- raise_exception('a system message must be followed by a user message') -}}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) or message['role'] not in ['user', 'assistant'] -%}"
    "{{- raise_exception('after an optional system message, roles must alternate user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- message['content'] | trim + eos_token -}}"
    "{%- elif system -%}"
    f"{{{{- bos_token + {_literal(_INPUT_HEAD)} + message['content'] | trim + {_literal(_INPUT_MID)} + system"
    f" + {_literal(_INPUT_TAIL)} -}}}}"
    "{%- else -%}"
    f"{{{{- bos_token + {_literal(_PLAIN_HEAD)} + message['content'] | trim + {_literal(_PLAIN_TAIL)} -}}}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

CHAT_TEMPLATES: Dict[str, str] = {
    "llama2": _LLAMA2,
    "llama3": _LLAMA3,
    "alpaca": _ALPACA,
}
