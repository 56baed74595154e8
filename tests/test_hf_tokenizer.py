"""Hugging Face tokenizer files: what transformers loads from an exported folder (AutoTokenizer, the
chat template, pipeline, `transformers serve`) gives our ids and text, and a folder with only
tokenizer.json loads here through `tokenizers` with the same ids."""
import copy
import json
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import asset, free_port, run_main, script, start_process, subprocess_env
from llama import Llama
from llama.commands import generate
from llama.chat_format import encode_dialog
from llama.checkpoint import write_checkpoint
from llama.hf import write_hf
from llama.hf_tokenizer import write_tokenizer_files
from llama.loading import open_checkpoint
from llama.sp_model import read_sentencepiece_model
from llama.tiny import TINY_PARAMS, random_state_dict
from llama.model import ModelArgs
from llama.tokenizer import HFTokenizer, find_tokenizer, load_tokenizer
from test_tokenizer import LLAMA3_SENTENCES, write_tiny_tiktoken

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

ASSETS = {"llama": "llama_tokenizer.model", "tok512": "tok512.model", "llama3": "llama3_tokenizer.model"}
SENTENCEPIECE = ("llama", "tok512", "tiny")
ALL = (*SENTENCEPIECE, "llama3")

EDGE = [
    "", " ", "  ", "  leading and trailing  ", "\t\ttabs\n\nnewlines\r\n", "x" + " " * 40 + "y", " " * 17,
    "é ñ ß ø Å", "日本語のテキスト 中文", "emoji 🦙👍🏽 family 👨‍👩‍👧 flag 🇯🇵", "\x00\x07 control \x7f",
    "zero\u200bwidth nbsp\u00a0ideographic\u3000space", "ｆｕｌｌｗｉｄｔｈ ﬁ ①", "1234567890 3.14159",
    "It's  spaced\n\nout!!! CAN'T", "[INST] not a tag here [/INST]", "\ufeffbom", "a\u0301 combining",
]
SPECIAL_TEXT = ["<s>hi</s>", "<unk> x", "<|eot_id|>", "a<|begin_of_text|>b<|start_header_id|>"]

DIALOGS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " What is 2+2? "}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": " b "}, {"role": "user", "content": "c\n"}],
    [{"role": "system", "content": "You are a pirate.\n"}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Arr!"}, {"role": "user", "content": "Where is the treasure?"},
     {"role": "assistant", "content": "Buried."}, {"role": "user", "content": "Where exactly?  "}],
    [{"role": "user", "content": "émoji 🦙 and 世界\n\nsecond paragraph"}],
]


@pytest.fixture(scope="module")
def exported(tiny_ckpt, tmp_path_factory):
    """name -> (our tokenizer, transformers' AutoTokenizer of the exported files, the folder); built once."""
    cache = {}

    def get(name):
        if name not in cache:
            src = tiny_ckpt / "tokenizer.model" if name == "tiny" else asset(ASSETS[name])
            out = tmp_path_factory.mktemp(name)
            write_tokenizer_files(src, out)
            cache[name] = load_tokenizer(src), transformers.AutoTokenizer.from_pretrained(out), out
        return cache[name]

    return get


def with_template(hf, chat_format):
    """A copy of AutoTokenizer `hf` with chat format `chat_format`'s template (the export's choice is
    tested in test_export_takes_the_chat_format_in_use)."""
    from llama.chat_templates import CHAT_TEMPLATES

    hf = copy.deepcopy(hf)
    hf.chat_template = CHAT_TEMPLATES[chat_format]
    return hf


def hf_ids(hf, text, **kwargs):
    return hf(text, **kwargs)["input_ids"]


def hf_decode(hf, name, ids):
    # SentencePiece drops control tokens when decoding; tiktoken writes Llama 3's special tokens out
    return hf.decode(ids, skip_special_tokens=name != "llama3")


def read(path):
    return json.loads(path.read_text())


def test_sentencepiece_proto_fields_of_the_real_llama_tokenizer():
    model = read_sentencepiece_model(asset("llama_tokenizer.model").read_bytes())
    assert (len(model.pieces), model.model_type, model.byte_fallback, model.normalizer_name) == (32000, 2, True,
                                                                                                 "identity")
    assert (model.add_dummy_prefix, model.remove_extra_whitespaces, model.escape_whitespaces) == (True, False, True)
    assert [(p.piece, p.type) for p in model.pieces[:4]] == [("<unk>", 2), ("<s>", 3), ("</s>", 3), ("<0x00>", 6)]
    assert (model.pieces[306].piece, model.pieces[306].score) == ("▁I", -47.0)
    with pytest.raises(ValueError, match="not a SentencePiece model proto"):
        read_sentencepiece_model(b"\x0a\xff")


def test_real_llama_tokenizer_in_autotokenizer(exported):
    ours, hf, out = exported("llama")
    assert hf_ids(hf, "I believe the meaning of life is") == [1, 306, 4658, 278, 6593, 310, 2834, 338]
    assert hf_ids(hf, "1234 emoji 🦙 世界", add_special_tokens=False) == [
        29871, 29896, 29906, 29941, 29946, 953, 29877, 2397, 29871, 243, 162, 169, 156, 29871, 30793, 30967]
    assert hf.decode([1, 15043, 3186, 2], skip_special_tokens=True) == "Hello world"
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, len(hf)) == (1, 2, 0, 32000)
    config = read(out / "tokenizer_config.json")
    assert {k: config[k] for k in ("tokenizer_class", "bos_token", "eos_token", "add_bos_token", "legacy")} == {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
        "legacy": True}
    assert read(out / "special_tokens_map.json") == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert read(out / "generation_config.json") == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


@pytest.mark.slow
def test_llama3_tokenizer_in_autotokenizer(exported):
    ours, hf, out = exported("llama3")
    assert hf_ids(hf, "I believe the meaning of life is") == [128000, 40, 4510, 279, 7438, 315, 2324, 374]
    for text, ids in LLAMA3_SENTENCES.items():
        assert hf_ids(hf, text, add_special_tokens=False) == ids and hf.decode(ids) == text
    assert len(hf) == 128256
    assert hf.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|eom_id|>",
                                     "<|eot_id|>", "<|reserved_special_token_247|>"]) == [
        128000, 128001, 128006, 128008, 128009, 128255]
    assert hf.decode([128006, 882, 128007]) == "<|start_header_id|>user<|end_header_id|>"
    assert read(out / "generation_config.json") == {
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "pad_token_id": 128001}
    assert read(out / "special_tokens_map.json") == {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}


@pytest.mark.parametrize("name", ALL)
def test_edge_cases_encode_and_decode_as_ours(exported, name):
    ours, hf, _ = exported(name)
    for text in EDGE:
        ids = ours.encode(text, bos=True, eos=False)
        assert hf_ids(hf, text) == ids, text
        assert hf_decode(hf, name, ids) == ours.decode(ids), text


@pytest.mark.parametrize("name", ALL)
def test_special_token_text_is_text_when_split(exported, name):
    """Ours never reads special-token text in a string as the token; transformers does unless asked
    with split_special_tokens=True (its default matches it, which chat templates rely on)."""
    ours, hf, _ = exported(name)
    for text in SPECIAL_TEXT:
        assert hf_ids(hf, text, split_special_tokens=True) == ours.encode(text, bos=True, eos=False), text
    special = "<|eot_id|>" if name == "llama3" else "</s>"
    assert hf_ids(hf, special, add_special_tokens=False) == [128009 if name == "llama3" else 2]


PIECES = [" ", "  ", "\n", "\t", "\r\n", "a", "the", " the", "é", "ß", "🦙", "👍🏽", "世界", "\u00a0", "\u3000", "ﬁ",
          "12", "'s", "'LL", "[INST]", "<0x41>", "▁", "\x00"]
texts = st.one_of(
    st.text(max_size=40), st.lists(st.sampled_from(PIECES), max_size=16).map("".join),
    st.lists(st.one_of(st.sampled_from(PIECES), st.characters(exclude_categories=("Cs",))), max_size=16).map("".join))


def _graphemes_of_one_code_point(text: str) -> bool:
    import regex  # a transformers dependency

    return all(len(g) == 1 for g in regex.findall(r"\X", text))


@pytest.mark.parametrize("name", ALL)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_any_text_encodes_and_decodes_as_ours(exported, name, text):
    ours, hf, _ = exported(name)
    assume(not any(t in text for t in hf.added_tokens_encoder))  # see test_special_token_text_is_text_when_split
    if name == "tiny":
        # Its nmt_nfkc character map goes through tokenizers' Precompiled normalizer, which maps whole
        # graphemes and drops what follows a mapped prefix (huggingface/tokenizers#2116); LLaMA's and
        # tok512's models have no character map.
        assume(_graphemes_of_one_code_point(text))
    ids = ours.encode(text, bos=True, eos=False)
    assert hf_ids(hf, text) == ids
    assert hf_decode(hf, name, ids) == ours.decode(ids)


@pytest.mark.parametrize("name, chat_format", [("llama", None), ("tiny", None), ("llama3", None),
                                               ("llama", "alpaca"), ("tiny", "alpaca"), ("llama3", "alpaca")])
def test_chat_template_gives_encode_dialog_ids(exported, name, chat_format):
    ours, hf, _ = exported(name)
    hf = hf if chat_format is None else with_template(hf, chat_format)
    for dialog in DIALOGS:
        assert hf.apply_chat_template(dialog, add_generation_prompt=True, return_dict=True)["input_ids"] == \
            encode_dialog(ours, dialog, chat_format), dialog


def test_alpaca_chat_template_text(exported):
    """Stanford Alpaca's two templates, the system message as the Input, earlier exchanges as whole
    BOS..EOS examples; a dialog that ends with an answer closes its last example."""
    hf = with_template(exported("tiny")[1], "alpaca")
    assert hf.apply_chat_template(DIALOGS[1], add_generation_prompt=True, tokenize=False) == (
        "<s>Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nWhat is 2+2?\n\n"
        "### Input:\nBe brief.\n\n### Response:\n")
    plain = ("<s>Below is an instruction that describes a task. Write a response that appropriately completes the "
             "request.\n\n### Instruction:\n{}\n\n### Response:\n")
    assert hf.apply_chat_template(DIALOGS[2], tokenize=False) == plain.format("a") + "b</s>" + plain.format("c")
    finished = DIALOGS[2][:2]
    assert hf.apply_chat_template(finished, tokenize=False) == plain.format("a") + "b</s>"
    for bad in ([{"role": "assistant", "content": "x"}], [{"role": "system", "content": "x"}]):
        with pytest.raises(Exception, match="roles must alternate|must be followed by a user message"):
            hf.apply_chat_template(bad, tokenize=False)


def test_llama2_chat_template_text_and_ids(exported):
    _, hf, _ = exported("llama")
    assert hf.apply_chat_template(DIALOGS[0], add_generation_prompt=True, return_dict=True)["input_ids"] == [
        1, 518, 25580, 29962, 6324, 727, 518, 29914, 25580, 29962]
    assert hf.apply_chat_template(DIALOGS[1], tokenize=False) == \
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n What is 2+2? [/INST]"
    assert hf.apply_chat_template(DIALOGS[2], tokenize=False) == "<s>[INST] a [/INST] b </s><s>[INST] c [/INST]"
    with pytest.raises(Exception, match="roles must alternate"):
        hf.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)


def test_llama3_chat_template_text(exported):
    _, hf, _ = exported("llama3")
    assert hf.apply_chat_template(DIALOGS[1], add_generation_prompt=True, tokenize=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("name", ("llama", "tiny", "llama3"))
def test_tokenizer_json_alone_loads_with_our_ids(exported, name):
    ours, _, out = exported(name)
    assert not (out / "tokenizer.model").exists()
    tok = load_tokenizer(find_tokenizer(out))
    assert isinstance(tok, HFTokenizer)
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.default_chat_format) == (
        ours.n_words, ours.bos_id, ours.eos_id, ours.pad_id, ours.stop_ids, ours.default_chat_format)
    for text in EDGE + SPECIAL_TEXT:
        ids = ours.encode(text, bos=True, eos=True)
        assert tok.encode(text, bos=True, eos=True) == ids and tok.decode(ids) == ours.decode(ids), text
    for dialog in DIALOGS:
        assert encode_dialog(tok, dialog) == encode_dialog(ours, dialog)
    if name == "llama3":
        assert tok.special_tokens == ours.special_tokens
        assert (tok.eot_id, tok.eom_id, tok.start_header_id, tok.end_header_id) == (128009, 128008, 128006, 128007)


def convert(src, dst):
    """What `scripts/convert_checkpoint.py SRC DST --to hf` does, in this process."""
    return write_hf(open_checkpoint(src), dst)


def without_tokenizer_model(src, dst):
    shutil.copytree(src, dst)
    (dst / "tokenizer.model").unlink()
    return dst


@pytest.fixture(scope="module")
def tiny_hf(tiny_ckpt, tmp_path_factory):
    return convert(tiny_ckpt, tmp_path_factory.mktemp("hf") / "tiny_hf")


def test_hf_to_hf_keeps_the_tokenizer_files(tiny_hf, tmp_path):
    names = ["generation_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
             "tokenizer_config.json"]
    again = convert(tiny_hf, tmp_path / "again")
    assert all((again / n).read_bytes() == (tiny_hf / n).read_bytes() for n in names)
    # a folder with only tokenizer.json (and its own chat template) keeps them as they are
    alone = without_tokenizer_model(tiny_hf, tmp_path / "alone")
    config = read(alone / "tokenizer_config.json")
    (alone / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ 'custom' }}"}))
    out = convert(alone, tmp_path / "out")
    assert not (out / "tokenizer.model").exists()
    assert read(out / "tokenizer_config.json")["chat_template"] == "{{ 'custom' }}"
    assert (out / "tokenizer.json").read_bytes() == (tiny_hf / "tokenizer.json").read_bytes()
    assert read(out / "config.json")["eos_token_id"] == 2


def test_export_takes_the_chat_format_in_use(tiny_ckpt, tiny_hf, tmp_path):
    """write_hf(..., chat_format="alpaca") (convert_checkpoint.py --chat_format alpaca): the folder's chat
    template is Alpaca's, from a Meta source (built) or a Hugging Face one (its own replaced, its other files
    kept); a format the tokenizer cannot speak, or none, is refused before anything is written."""
    from llama.chat_templates import CHAT_TEMPLATES

    ours = load_tokenizer(tiny_ckpt / "tokenizer.model")
    for i, src in enumerate((tiny_ckpt, tiny_hf)):
        out = write_hf(open_checkpoint(src), tmp_path / f"alpaca{i}", chat_format="alpaca")
        assert read(out / "tokenizer_config.json")["chat_template"] == CHAT_TEMPLATES["alpaca"]
        assert (out / "tokenizer.json").read_bytes() == (tiny_hf / "tokenizer.json").read_bytes()
        hf = transformers.AutoTokenizer.from_pretrained(out)
        for dialog in DIALOGS:
            assert hf.apply_chat_template(dialog, add_generation_prompt=True, return_dict=True)["input_ids"] == \
                encode_dialog(ours, dialog, "alpaca")
    with pytest.raises(ValueError, match="chat_format='vicuna' is not one of"):
        write_hf(open_checkpoint(tiny_ckpt), tmp_path / "bad", chat_format="vicuna")
    assert not (tmp_path / "bad").exists()
    status, _, err = run_main(script("convert_checkpoint").main, tiny_ckpt, tmp_path / "bad", "--to", "hf",
                              "--chat_format", "llama3")
    assert status == 1 and not (tmp_path / "bad").exists()
    assert err.strip() == ("error: --chat_format='llama3' needs Llama 3's tiktoken tokenizer (its header "
                           "tokens); this checkpoint has a SentencePiece one: use 'llama2' or leave "
                           "--chat_format unset")


def test_a_sentencepiece_model_tokenizer_json_cannot_match_is_left_out_with_a_warning(tiny_ckpt, tmp_path, caplog):
    import sentencepiece as spm

    from llama.tiny import _corpus

    src = shutil.copytree(tiny_ckpt, tmp_path / "unigram")
    with open(src / "tokenizer.model", "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus(0, 500)), model_writer=f, vocab_size=200,
                                       model_type="unigram", minloglevel=2)
    out = convert(src, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert "no Hugging Face tokenizer files" in caplog.text and "not a BPE model" in caplog.text


def test_build_from_a_folder_with_only_tokenizer_json(tiny_hf, tiny_llama, tmp_path):
    path = without_tokenizer_model(tiny_hf, tmp_path / "alone")
    g = Llama.build(str(path), max_seq_len=64, max_batch_size=4, model_parallel_size=1)
    assert isinstance(g.tokenizer, HFTokenizer)
    prompts = ["The cat sat", "émoji 🦙 and 世界"]
    assert g.text_completion(prompts, temperature=0, max_gen_len=10) == \
        tiny_llama.text_completion(prompts, temperature=0, max_gen_len=10)
    assert g.chat_completion(DIALOGS[:2], temperature=0, max_gen_len=8) == \
        tiny_llama.chat_completion(DIALOGS[:2], temperature=0, max_gen_len=8)


def test_example_py_runs_a_folder_with_only_tokenizer_json(tiny_hf, tiny_llama, tmp_path):
    path = without_tokenizer_model(tiny_hf, tmp_path / "alone")
    status, out, err = run_main(generate.main, "--ckpt_dir", path, "--temperature", "0", "--max_gen_len", "8",
                                "--prompts", "The cat sat")
    assert status == 0, err
    expected = tiny_llama.text_completion(["The cat sat"], temperature=0, max_gen_len=8)[0]["generation"]
    assert out.startswith("The cat sat" + expected + "\n")


def test_build_llama3_style_tokenizer_json_chats_as_tiktoken(tmp_path):
    tok = write_tiny_tiktoken(tmp_path / "tiktoken.model")
    params = {**TINY_PARAMS, "vocab_size": 712, "rope_theta": 500000.0}
    meta = write_checkpoint(tmp_path / "meta", params, random_state_dict(ModelArgs.from_params(params), seed=3),
                            tokenizer_path=tok)
    alone = without_tokenizer_model(convert(meta, tmp_path / "hf"), tmp_path / "alone")
    native = Llama.build(str(meta), max_seq_len=128, max_batch_size=2, model_parallel_size=1)
    g = Llama.build(str(alone), max_seq_len=128, max_batch_size=2, model_parallel_size=1)
    assert isinstance(g.tokenizer, HFTokenizer) and g.tokenizer.default_chat_format == "llama3"
    assert g.tokenizer.stop_ids == native.tokenizer.stop_ids == {457, 464, 465}
    assert g.encode_dialog(DIALOGS[3]) == native.encode_dialog(DIALOGS[3])
    assert g.chat_completion(DIALOGS[:2], temperature=0, max_gen_len=10) == \
        native.chat_completion(DIALOGS[:2], temperature=0, max_gen_len=10)


def test_a_folder_without_any_tokenizer_is_refused(tiny_hf, tmp_path):
    path = without_tokenizer_model(tiny_hf, tmp_path / "none")
    (path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="neither tokenizer.model .* nor tokenizer.json"):
        Llama.build(str(path), max_seq_len=16, max_batch_size=1, model_parallel_size=1)


@pytest.fixture(scope="module")
def stories(stories_ckpt, tmp_path_factory):
    """The real stories260K, ours and as a Hugging Face folder from scripts/convert_checkpoint.py."""
    hf = tmp_path_factory.mktemp("hf") / "stories_hf"
    status, _, err = run_main(script("convert_checkpoint").main, stories_ckpt, hf, "--to", "hf")
    assert status == 0, err
    return Llama.build(str(stories_ckpt), max_seq_len=128, max_batch_size=2, model_parallel_size=1), hf


def test_pipeline_greedy_text_equals_ours(stories):
    g, path = stories
    pipe = transformers.pipeline("text-generation", model=str(path), device="cpu")
    ours = g.text_completion(["Once upon a time"], temperature=0, max_gen_len=20)[0]["generation"]
    assert ours.startswith(", there was a little girl named Lily.")
    assert pipe("Once upon a time", max_new_tokens=20, do_sample=False, return_full_text=False)[0][
        "generated_text"] == ours
    # the pipeline decodes the new tokens alone, which drops the first piece's space; the ids agree
    prompt = g.tokenizer.encode("The little dog", bos=True, eos=False)
    tokens, _ = g.generate([prompt], max_gen_len=12, temperature=0)
    assert pipe("The little dog", max_new_tokens=12, do_sample=False, return_tensors=True)[0][
        "generated_token_ids"] == prompt + tokens[0]
    chat = [{"role": "user", "content": "Tell me a story"}]
    answer = pipe(chat, max_new_tokens=10, do_sample=False)[0]["generated_text"][-1]
    assert answer == g.chat_completion([chat], temperature=0, max_gen_len=10)[0]["generation"]


def _post(url, body, timeout):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


def _wait_healthy(proc, port, log, deadline):
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"transformers serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"transformers serve did not come up:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_transformers_serve_answers_as_ours(stories, tmp_path):
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        pytest.skip("transformers serve needs fastapi, uvicorn, openai and pydantic: pip install 'llama[test]'")
    g, path = stories
    expected = g.text_completion(["Once upon a time"], temperature=0, max_gen_len=20)[0]["generation"]
    chat = [{"role": "user", "content": "Tell me a story"}]
    answer = g.chat_completion([chat], temperature=0, max_gen_len=10)[0]["generation"]
    modes = {"plain": [], "continuous batching": [  # a small paged cache: the default is sized for a GPU
        "--continuous-batching", "--cb-num-blocks", "16", "--cb-block-size", "32", "--cb-max-batch-tokens", "64"]}
    servers = {}
    try:
        for mode, flags in modes.items():  # both start at once: most of the time is their start-up
            port, log = free_port(), tmp_path / f"{mode}.log"
            cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(path), "--host", "127.0.0.1",
                   "--port", str(port), "--device", "cpu", *flags]
            with open(log, "wb") as out:
                proc = start_process(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                        env=subprocess_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
            servers[mode] = proc, port, log
        deadline = time.monotonic() + 90
        for mode, (proc, port, log) in servers.items():
            _wait_healthy(proc, port, log, deadline)
            reply = _post(f"http://127.0.0.1:{port}/v1/completions", {
                "model": str(path), "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}, timeout=60)
            assert reply["choices"][0]["text"] == expected, mode
            assert reply["usage"]["completion_tokens"] == 20, mode
            reply = _post(f"http://127.0.0.1:{port}/v1/chat/completions", {
                "model": str(path), "messages": chat, "max_tokens": 10, "temperature": 0}, timeout=60)
            assert reply["choices"][0]["message"] == answer, mode  # through our chat template
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
        for proc, _, _ in servers.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
