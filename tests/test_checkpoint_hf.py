"""Hugging Face Llama folders: conversion both ways, loading per rank, parity with transformers, bad input."""
import json
import logging
import shutil

import pytest
import torch

from conftest import logits, run_main, script
from dist_worker import PROMPTS
from llama import Llama
from llama.checkpoint import load_shard, split_state_dict, write_checkpoint
from llama.errors import CheckpointError
from llama.hf import write_hf
from llama.loading import open_checkpoint

transformers = pytest.importorskip("transformers")


def convert(src, dst, to, *extra):
    status, _, err = run_main(script("convert_checkpoint").main, src, dst, "--to", to, *extra)
    assert status == 0, err
    return dst


@pytest.fixture(scope="module")
def tiny_hf(tiny_ckpt2, tmp_path_factory):
    """tiny_ckpt's weights (grouped-query: 4 heads, 2 kv heads), converted from the 2-shard copy."""
    return convert(tiny_ckpt2, tmp_path_factory.mktemp("hf") / "tiny_hf", "hf")


def test_meta_hf_meta_round_trip_gives_identical_tensors(tiny_ckpt2, tiny_hf, tmp_path):
    assert sorted(p.name for p in tiny_hf.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer.model", "tokenizer_config.json"]
    config = json.loads((tiny_hf / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # from the folder's tokenizer.model
    assert len({p.stat().st_mode for p in tiny_hf.iterdir()}) == 1  # the same permissions for every file
    back = convert(tiny_hf, tmp_path / "back", "meta", "--num_shards", "2")
    for i in range(2):
        name = f"consolidated.{i:02d}.pth"
        got, expected = load_shard(back / name), load_shard(tiny_ckpt2 / name)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert (back / "tokenizer.model").read_bytes() == (tiny_ckpt2 / "tokenizer.model").read_bytes()


def test_transformers_reads_our_folder_with_our_logits(tiny_hf, tiny_llama):
    ref = transformers.LlamaForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(tokens).logits
    assert (logits(tiny_llama.model, tokens) - expected).abs().max().item() < 1e-4


def test_building_from_our_folder_matches_native(tiny_hf, tiny_llama):
    g = Llama.build(str(tiny_hf), max_seq_len=64, max_batch_size=4, model_parallel_size=1)
    tokens = torch.tensor([g.tokenizer.encode(PROMPTS[2], bos=True, eos=False)])
    torch.testing.assert_close(logits(g.model, tokens), logits(tiny_llama.model, tokens), atol=1e-5, rtol=1e-5)
    assert g.text_completion(PROMPTS, temperature=0, max_gen_len=12) == \
        tiny_llama.text_completion(PROMPTS, temperature=0, max_gen_len=12)


def test_rank_slices_of_a_hf_folder_equal_the_native_split(tiny_hf, tiny_ckpt):
    native = split_state_dict(load_shard(tiny_ckpt / "consolidated.00.pth"), 2)
    ckpt = open_checkpoint(tiny_hf, 2)
    for rank in range(2):
        got = dict(ckpt.rank_tensors(rank, 2))
        assert got.keys() == native[rank].keys()
        assert all(torch.equal(got[k], native[rank][k]) for k in got)


@pytest.fixture(scope="module")
def transformers_folder(tiny_ckpt, tmp_path_factory):
    """A folder transformers itself wrote: tied embeddings, several safetensors files with an index."""
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that a wrong permutation shows in the logits
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    out = tmp_path_factory.mktemp("hf") / "written_by_transformers"
    model.save_pretrained(out, max_shard_size="100KB")
    shutil.copyfile(tiny_ckpt / "tokenizer.model", out / "tokenizer.model")
    return model, out


def test_a_folder_transformers_wrote_gives_its_logits(transformers_folder):
    model, path = transformers_folder
    assert (path / "model.safetensors.index.json").is_file()
    g = Llama.build(str(path), max_seq_len=32, max_batch_size=2, model_parallel_size=1)
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
    assert (logits(g.model, tokens) - expected).abs().max().item() < 1e-4


def test_llama31_rope_scaling_folder_gives_its_logits_and_round_trips(tiny_ckpt, tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=rope,
        max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    model.save_pretrained(tmp_path / "scaled")
    shutil.copyfile(tiny_ckpt / "tokenizer.model", tmp_path / "scaled" / "tokenizer.model")
    g = Llama.build(str(tmp_path / "scaled"), max_seq_len=64, max_batch_size=1, model_parallel_size=1)
    assert g.model.params.use_scaled_rope and g.model.params.rope_original_max_seq_len == 32
    tokens = torch.randint(0, 512, (1, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(tokens).logits
    assert (logits(g.model, tokens) - expected).abs().max().item() < 1e-4
    meta = convert(tmp_path / "scaled", tmp_path / "meta", "meta")
    params = json.loads((meta / "params.json").read_text())
    assert params["use_scaled_rope"] and params["rope_scale_factor"] == 8.0
    back = convert(meta, tmp_path / "back", "hf")
    scaling = json.loads((back / "config.json").read_text())["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["original_max_position_embeddings"] == 32


def edited(src, dst, config=None, file=None, change=None):
    shutil.copytree(src, dst)
    if config is not None:
        (dst / "config.json").write_text(json.dumps({**json.loads((dst / "config.json").read_text()), **config}))
    if change is not None:
        change(dst / file)
    return dst


BAD = {
    "config not JSON": (dict(file="config.json", change=lambda p: p.write_text("{")), "config.json is not valid JSON"),
    "not llama": (dict(config={"model_type": "mistral"}), "model_type is 'mistral', not 'llama'"),
    "bitsandbytes": (dict(config={"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                                          "bnb_4bit_quant_type": "nf4"}}),
                     "the weights are quantized (bitsandbytes nf4), which this library does not read"),
    "rope scaling": (dict(config={"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}),
                     "RoPE scaling 'yarn' is not supported"),
    "shape vs config": (dict(config={"intermediate_size": 128}),
                        "has shape (192, 64) but config.json implies (128, 64)"),
    "truncated": (dict(file="model.safetensors", change=lambda p: p.write_bytes(p.read_bytes()[:-100])),
                  "model.safetensors could not be read"),
    "no weights": (dict(file="model.safetensors", change=lambda p: p.unlink()), "model.safetensors is missing"),
    # Issue 18, items 5 and 8: sizes beyond any real model, and a RoPE base that is not a positive number.
    "layers 10**9": (dict(config={"num_hidden_layers": 10**9}), "config.json: n_layers=1000000000 must be an integer "
                     "from 1 to 1024"),
    "rope_theta NaN": (dict(config={"rope_theta": float("nan")}), "config.json: rope_theta=nan must be a finite number "
                       "above 0"),
    "rope_theta 0": (dict(config={"rope_theta": 0}), "rope_theta=0 must be a finite number above 0"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_hf_folder_is_refused(tiny_hf, tmp_path, case):
    edit, message = BAD[case]
    path = edited(tiny_hf, tmp_path / "bad", **edit)
    with pytest.raises((CheckpointError, FileNotFoundError)) as err:
        Llama.build(str(path), max_seq_len=16, max_batch_size=1, model_parallel_size=1)
    assert message in str(err.value)


def test_missing_file_of_a_sharded_folder(transformers_folder, tmp_path):
    path = edited(transformers_folder[1], tmp_path / "bad")
    gone = sorted(path.glob("model-*-of-*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=f"{gone.name} is missing"):
        open_checkpoint(path)


def with_index(src, dst, name):
    """A copy of folder `src` whose index maps every tensor to the file `name`."""
    path = edited(src, dst)
    keys = list(load_shard_keys(path / "model.safetensors"))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(keys, name)}))
    return path


def load_shard_keys(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("name", ["../outside.safetensors", "{outside}", "sub/../../outside.safetensors"])
def test_an_index_naming_a_file_outside_the_folder_is_refused(tiny_hf, tmp_path, name):
    """Issue 18, item 7: a weight_map entry '../outside.safetensors' once loaded a file from outside the folder."""
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(tiny_hf / "model.safetensors", outside)
    name = name.format(outside=outside)
    path = with_index(tiny_hf, tmp_path / "folder", name)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json names the file .*outside.safetensors', "
                                              "which is not inside .*folder: a checkpoint may only name files in its "
                                              "own folder"):
        open_checkpoint(path)


def test_an_index_may_name_a_link_to_elsewhere(tiny_hf, tmp_path, tiny_llama):
    """The Hugging Face cache's layout: a snapshot's files are symbolic links to blobs outside its folder."""
    blob = tmp_path / "blobs" / "1234abcd"
    blob.parent.mkdir()
    shutil.copyfile(tiny_hf / "model.safetensors", blob)
    path = with_index(tiny_hf, tmp_path / "snapshot", "model-00001-of-00001.safetensors")
    (path / "model.safetensors").unlink()
    (path / "model-00001-of-00001.safetensors").symlink_to(blob)
    g = Llama.build(str(path), max_seq_len=32, max_batch_size=1)
    assert g.text_completion(["The cat"], temperature=0, max_gen_len=6) == tiny_llama.text_completion(
        ["The cat"], temperature=0, max_gen_len=6)


def test_a_failed_conversion_leaves_no_folder(tiny_hf, tmp_path):
    bad = edited(tiny_hf, tmp_path / "bad", config={"num_hidden_layers": 3})
    status, _, err = run_main(script("convert_checkpoint").main, bad, tmp_path / "out", "--to", "meta")
    assert status == 1 and "missing: ['model.layers.2." in err and err.startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_llama31_export_has_more_positions_than_its_original_context(tiny_ckpt, tmp_path, caplog, monkeypatch):
    """transformers warns when max_position_embeddings <= rope_scaling's original_max_position_embeddings."""
    params = {**json.loads((tiny_ckpt / "params.json").read_text()), "use_scaled_rope": True,
              "rope_scale_factor": 8.0, "rope_original_max_seq_len": 8192}
    write_checkpoint(tmp_path / "meta", params, load_shard(tiny_ckpt / "consolidated.00.pth"))
    out = write_hf(open_checkpoint(tmp_path / "meta"), tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 65536  # 8192 x 8
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    with caplog.at_level(logging.WARNING):
        config = transformers.LlamaConfig.from_pretrained(out)
    assert config.max_position_embeddings == 65536
    assert not [r for r in caplog.records if "max_position_embeddings" in r.getMessage()], caplog.text
