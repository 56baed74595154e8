"""Llama 3.1 tool calling in the library: the prompt as Meta's published format writes it (token for token,
on the real Llama 3 tokenizer), the same through the exported Hugging Face chat template, answers parsed
into tool calls, and the formats without tools refusing them."""
import json

import pytest

from conftest import asset
from llama.chat_format import encode_dialog, parse_tool_calls, tool_call_schema
from llama.tokenizer import load_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
DIALOG = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "What is the weather in Paris?"},
          {"role": "assistant", "content": None, "tool_calls": [CALL]},
          {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(asset("llama3_tokenizer.model"))


def meta_text(tools, dialog) -> str:
    """The prompt as Meta's Llama 3.1 prompt-format guide writes it for JSON-based tool calling."""
    system = dialog[0]["content"]
    text = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" + system + "<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON "
            "for a function call with its proper arguments that best answers the given prompt.\n\nRespond in the "
            'format {"name": function name, "parameters": dictionary of argument name and its value}.Do not use '
            "variables.\n\n")
    text += "".join(json.dumps(t, indent=4) + "\n\n" for t in tools) + dialog[1]["content"] + "<|eot_id|>"
    for m in dialog[2:]:
        if m.get("tool_calls"):
            f = m["tool_calls"][0]["function"]
            text += ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "' + f["name"] + '", "parameters": '
                     + f["arguments"] + "}<|eot_id|>")
        else:
            text += "<|start_header_id|>ipython<|end_header_id|>\n\n" + m["content"] + "<|eot_id|>"
    return text + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_the_tool_prompt_is_metas_llama_3_1_format_token_for_token(tok):
    ids = encode_dialog(tok, DIALOG, "llama3", tools=[WEATHER, TIME])
    assert ids == tok.model.encode(meta_text([WEATHER, TIME], DIALOG), allowed_special="all")
    # pinned: <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n
    assert ids[:10] == [128000, 128006, 9125, 128007, 271, 13013, 25, 6125, 27993, 198]
    assert ids[-5:] == [128009, 128006, 78191, 128007, 271]  # ...<|eot_id|> and the open assistant header
    assert 128010 not in ids  # no <|python_tag|> where the assistant's call is a plain JSON answer


def test_the_exported_chat_template_gives_the_same_ids(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    from llama.hf_tokenizer import write_tokenizer_files

    write_tokenizer_files(asset("llama3_tokenizer.model"), tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for dialog, tools in ((DIALOG, [WEATHER, TIME]), (DIALOG[1:2], [WEATHER]), (DIALOG[:2], None)):
        got = hf.apply_chat_template(dialog, tools=tools, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert got == encode_dialog(tok, dialog, "llama3", tools=tools)


def test_answers_are_parsed_into_tool_calls():
    names = ["get_weather", "get_time"]
    assert parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Oslo"}}', names) == [
        ("get_weather", '{"city": "Oslo"}')]
    assert parse_tool_calls('<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}; '
                            '{"name": "get_weather", "arguments": {"city": "Rome"}}', names) == [
        ("get_time", '{"zone": "UTC"}'), ("get_weather", '{"city": "Rome"}')]
    for text in ("The weather is fine.", '{"name": "get_news", "parameters": {}}',
                 '{"name": "get_time", "parameters": "UTC"}', '{"name": "get_time", "parameters": {}} and more',
                 ""):
        assert parse_tool_calls(text, names) is None, text


def test_a_call_schema_names_one_tool_or_any():
    one = tool_call_schema([WEATHER, TIME], "get_time")
    assert one["properties"]["name"] == {"const": "get_time"} and one["required"] == ["name", "parameters"]
    assert [s["properties"]["name"]["const"] for s in tool_call_schema([WEATHER, TIME])["anyOf"]] == names_of(
        [WEATHER, TIME])


def names_of(tools):
    return [t["function"]["name"] for t in tools]


def test_formats_without_tool_calls_refuse_them(tiny_ckpt, tok):
    sp = load_tokenizer(tiny_ckpt / "tokenizer.model")
    for name in ("llama2", "alpaca"):
        with pytest.raises(ValueError, match=f"the {name} chat format has no tool calls: tools need a Llama 3"):
            encode_dialog(sp, DIALOG[:2], name, tools=[WEATHER])
    with pytest.raises(ValueError, match="tools.0. must be"):
        encode_dialog(tok, DIALOG[:2], "llama3", tools=[{"type": "function", "function": {}}])
    with pytest.raises(ValueError, match="a tool message must answer an assistant message's tool_calls"):
        encode_dialog(tok, DIALOG[:2] + [DIALOG[3]], "llama3", tools=[WEATHER])
    with pytest.raises(ValueError, match="tool call 'get_weather' must be a JSON object"):
        bad = dict(DIALOG[2], tool_calls=[{"function": {"name": "get_weather", "arguments": "[1]"}}])
        encode_dialog(tok, DIALOG[:2] + [bad, DIALOG[3]], "llama3", tools=[WEATHER])
