"""PEFT LoRA adapters merged at load: the same logits and greedy tokens as peft's own model, on
Meta-layout and Hugging Face bases, on one process and two; the merge script; every refusal."""
import io
import json
import shutil
import warnings
from pathlib import Path
from typing import Dict, List, NamedTuple

import pytest
import torch

from conftest import logits, run_main, script, torchrun
from dist_worker import PROMPTS
from llama import Llama
from llama.commands import chat, generate
from llama.checkpoint import load_shard, shard_dim, write_checkpoint, write_meta
from llama.errors import CheckpointError
from llama.hf import write_hf
from llama.loading import open_checkpoint
from llama.lora import MergedCheckpoint, open_adapter
from llama.quantize import quantize_state_dict

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=PROJECTIONS),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    # per-module ranks and alphas, the embedding and lm_head adapted, every norm replaced; saved as .bin
    "patterns": dict(r=4, lora_alpha=8, target_modules=PROJECTIONS + ["embed_tokens", "lm_head"],
                     rank_pattern={"q_proj": 2, "^model.layers.1.mlp.down_proj": 6},
                     alpha_pattern={"layers.0.self_attn.k_proj": 3.0, "lm_head": 5},
                     modules_to_save=["norm"]),
    # PEFT's narrowing of the targets: only layer 1, and not its k_proj
    "subset": dict(r=2, lora_alpha=4, target_modules=PROJECTIONS, layers_to_transform=[1], exclude_modules=["k_proj"]),
}
TOKENS = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
GREEDY_PROMPTS = [PROMPTS[0], PROMPTS[2]]


class Reference(NamedTuple):
    path: Path
    logits: torch.Tensor  # peft's model on TOKENS
    greedy: List[List[int]]  # peft's greedy continuation of each GREEDY_PROMPTS, up to EOS


@pytest.fixture(scope="module")
def hf_base(tiny_ckpt, tmp_path_factory) -> Path:
    return write_hf(open_checkpoint(tiny_ckpt), tmp_path_factory.mktemp("lora") / "hf_base")


@pytest.fixture(scope="module")
def base_logits(hf_base) -> torch.Tensor:
    with torch.no_grad():
        return transformers.LlamaForCausalLM.from_pretrained(hf_base, dtype=torch.float32).eval()(TOKENS).logits


@pytest.fixture(scope="module")
def adapters(hf_base, tiny_ckpt, tmp_path_factory) -> Dict[str, Reference]:
    """Each ADAPTERS config trained by nobody: peft's random init (init_lora_weights=False), and
    modules_to_save copies perturbed, saved by peft, with peft's logits and greedy tokens."""
    from llama.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_ckpt / "tokenizer.model")
    out = {}
    for name, kwargs in ADAPTERS.items():
        base = transformers.LlamaForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
        # peft draws the factors from the global RNG: the same adapters every run, the caller's RNG kept
        with warnings.catch_warnings(), torch.random.fork_rng():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notices, raised in peft
            torch.manual_seed(len(out))
            model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **kwargs)).eval()
        gen = torch.Generator().manual_seed(len(out))
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "modules_to_save" in key:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.2)
            logits = model(TOKENS).logits
            greedy = []
            for prompt in GREEDY_PROMPTS:
                ids = tok.encode(prompt, bos=True, eos=False)
                new = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                     max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_id,
                                     pad_token_id=tok.eos_id)[0, len(ids):].tolist()
                greedy.append(new[: new.index(tok.eos_id)] if tok.eos_id in new else new)
        path = tmp_path_factory.mktemp("lora") / name
        model.save_pretrained(path, safe_serialization=name != "patterns", save_embedding_layers=name == "patterns")
        out[name] = Reference(path, logits, greedy)
    assert (out["patterns"].path / "adapter_model.bin").is_file()
    return out


def build(base, lora=None, **kwargs) -> Llama:
    kwargs = {"max_seq_len": 64, "max_batch_size": 2, "model_parallel_size": 1, **kwargs}
    return Llama.build(str(base), lora=None if lora is None else str(lora), **kwargs)


def greedy(g: Llama) -> List[List[int]]:
    return [g.generate([g.tokenizer.encode(p, bos=True, eos=False)], max_gen_len=10, temperature=0)[0][0]
            for p in GREEDY_PROMPTS]


@pytest.mark.parametrize("layout", ["meta", "hf"])
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_merged_model_equals_peft(name, layout, adapters, tiny_ckpt, hf_base, base_logits):
    ref = adapters[name]
    assert (ref.logits - base_logits).abs().max() > 0.1  # the adapter really changes the model
    g = build(tiny_ckpt if layout == "meta" else hf_base, ref.path)
    assert (logits(g.model, TOKENS) - ref.logits).abs().max().item() < 1e-4
    assert greedy(g) == ref.greedy


@pytest.mark.parametrize("embedding_dim", [0, 1])
def test_each_rank_merges_only_its_slice(tiny_ckpt, adapters, embedding_dim):
    """Two ranks' merged slices, joined along the model's split, are the one-process merge."""
    ckpt = open_checkpoint(tiny_ckpt, 2)
    adapter = open_adapter(adapters["patterns"].path, ckpt)
    whole = dict(adapter.merged(ckpt.rank_tensors(0, 1), 0, 1))
    parts = [dict(adapter.merged(ckpt.rank_tensors(r, 2, embedding_dim=embedding_dim), r, 2, embedding_dim))
             for r in range(2)]
    assert not torch.equal(whole["tok_embeddings.weight"], load_shard(tiny_ckpt / "consolidated.00.pth")[
        "tok_embeddings.weight"])
    for name, t in whole.items():
        dim = embedding_dim if name == "tok_embeddings.weight" else shard_dim(name)
        joined = parts[0][name] if dim is None else torch.cat([p[name] for p in parts], dim)
        torch.testing.assert_close(joined, t, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_two_processes_equal_one(tiny_ckpt, tiny_ckpt2, adapters, tmp_path):
    ref = adapters["patterns"]
    proc = torchrun(2, "tests/dist_worker.py", str(tiny_ckpt2), str(tmp_path / "out"), str(ref.path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = torch.load(tmp_path / "out.rank0.pt", weights_only=True)
    one = build(tiny_ckpt, ref.path, max_batch_size=4)
    tokens = torch.tensor([one.tokenizer.encode(PROMPTS[0], bos=True, eos=False)])
    torch.testing.assert_close(rank0["logits"], logits(one.model, tokens), atol=1e-5, rtol=1e-5)
    assert rank0["greedy"] == one.text_completion(PROMPTS, temperature=0, max_gen_len=12)


def test_the_adapter_merges_before_int8_quantization(tiny_ckpt, adapters, tmp_path):
    """build(lora=..., quantize="int8") quantizes the merged weights: the same model as quantizing a
    merged checkpoint, and near peft's float model."""
    ref = adapters["plain"]
    ckpt = open_checkpoint(tiny_ckpt)
    write_meta(MergedCheckpoint(ckpt, open_adapter(ref.path, ckpt)), tmp_path / "merged", 1)
    got = logits(build(tiny_ckpt, ref.path, quantize="int8").model, TOKENS)
    torch.testing.assert_close(got, logits(build(tmp_path / "merged", quantize="int8").model, TOKENS), atol=0, rtol=0)
    assert (got - ref.logits).abs().max() < 0.1 * (logits(build(tiny_ckpt, quantize="int8").model, TOKENS) -
                                                   ref.logits).abs().max()


def merge(*args):
    """scripts/merge_lora.py's command line, in this process: (status, stdout, stderr)."""
    return run_main(script("merge_lora").main, *args)


def test_merge_script_output_loads_as_the_merged_model(tiny_ckpt, hf_base, adapters, tmp_path):
    ref = adapters["patterns"]
    with_lora = logits(build(tiny_ckpt, ref.path).model, TOKENS)
    status, _, err = merge(tiny_ckpt, ref.path, tmp_path / "as_hf", "--to", "hf")  # Meta base, HF output
    assert status == 0, err
    with torch.no_grad():  # transformers reads it as peft's model
        hf_logits = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "as_hf", dtype=torch.float32)(TOKENS).logits
    assert (hf_logits - ref.logits).abs().max().item() < 1e-4
    torch.testing.assert_close(logits(build(tmp_path / "as_hf").model, TOKENS), with_lora, atol=1e-6, rtol=0)

    status, _, err = merge(hf_base, ref.path, tmp_path / "as_meta", "--to", "meta", "--num_shards", "2")  # HF -> Meta
    assert status == 0, err
    assert sorted(p.name for p in (tmp_path / "as_meta").iterdir()) == [
        "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    torch.testing.assert_close(logits(build(tmp_path / "as_meta").model, TOKENS), with_lora, atol=1e-6, rtol=0)


def test_merge_script_bad_adapter_is_one_line_and_writes_nothing(tiny_ckpt, adapters, tmp_path):
    bad = edited(adapters["plain"].path, tmp_path / "bad", config={"use_dora": True})
    status, _, err = merge(tiny_ckpt, bad, tmp_path / "out")
    assert status == 1 and err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "use_dora=True is not supported" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_a_bad_lora_flag_is_one_line(tiny_ckpt, tmp_path):
    status, _, err = run_main(generate.main, "--ckpt_dir", tiny_ckpt, "--lora", tmp_path / "nowhere")
    assert status == 1
    assert err.strip().splitlines()[-1] == (f"error: LoRA adapter folder '{tmp_path / 'nowhere'}' does not "
                                            "exist: pass --lora with a PEFT adapter folder (adapter_config.json"
                                            " + adapter_model.safetensors or adapter_model.bin)")


def test_chat_with_an_adapter_in_alpaca_format(tiny_ckpt, adapters, monkeypatch):
    from test_chat import expected_transcript  # the system message is the Input of each instruction

    lines = ["Name three colours.", "And three animals?"]
    g = build(tiny_ckpt, adapters["plain"].path, chat_format="alpaca", max_seq_len=384, max_batch_size=1)
    args = ["--temperature", "0", "--max_gen_len", "10", "--max_seq_len", "384", "--system", "Be brief."]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    status, out, err = run_main(chat.main, "--ckpt_dir", tiny_ckpt, "--lora", adapters["plain"].path,
                                "--chat_format", "alpaca", *args)
    assert status == 0, err
    expected = expected_transcript(g, lines)
    assert out == expected
    plain = build(tiny_ckpt, chat_format="alpaca", max_seq_len=384, max_batch_size=1)
    assert expected_transcript(plain, lines) != expected  # the adapter shows in the answers


def edited(src: Path, dst: Path, config=None, tensors=None) -> Path:
    """A copy of adapter `src` with `config` keys set (None deletes) and `tensors` applied to its state dict."""
    shutil.copytree(src, dst)
    if config is not None:
        path = dst / "adapter_config.json"
        merged = {**json.loads(path.read_text()), **config}
        path.write_text(json.dumps({k: v for k, v in merged.items() if v is not None}))
    if tensors is not None:
        path = dst / "adapter_model.safetensors"
        state = safetensors_torch.load_file(path)
        tensors(state)
        safetensors_torch.save_file(state, path)
    return dst


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
FOREIGN = "base_model.model.transformer.h.0.attn.lora_A.weight"
REFUSED = {  # case: (edit of the "plain" adapter, part of the error)
    "dora": (dict(config={"use_dora": True}), "use_dora=True is not supported (DoRA"),
    "bias": (dict(config={"bias": "all"}), "bias='all' is not supported"),
    "lora_bias": (dict(config={"lora_bias": True}), "lora_bias=True is not supported"),
    "fan_in_fan_out": (dict(config={"fan_in_fan_out": True}), "fan_in_fan_out=True is not supported"),
    "layer_replication": (dict(config={"layer_replication": [[0, 2]]}), "layer_replication=[[0, 2]] is not supported"),
    "pissa": (dict(config={"init_lora_weights": "pissa"}), "init_lora_weights='pissa' changed the base weights"),
    "not lora": (dict(config={"peft_type": "IA3"}), "peft_type is 'IA3', not 'LORA'"),
    "unknown option": (dict(config={"future_config": {"x": 1}}), "future_config set, which this loader does not know"),
    "bad rank": (dict(config={"r": 0}), "r=0 must be a positive integer"),
    "absent targets": (dict(config={"target_modules": ["q_proj", "fc1", "query_key_value"]}),
                       "target_modules ['fc1', 'query_key_value'] are not modules of this Llama model"),
    "regex matches nothing": (dict(config={"target_modules": r".*\.c_attn"}),
                              r"target_modules '.*\\.c_attn' matches no module"),
    "config and weights disagree": (dict(config={"target_modules": ["q_proj"]}),
                                    "modules the config does not target: ['model.layers.0.mlp.down_proj'"),
    "modules_to_save absent": (dict(config={"modules_to_save": ["score"]}),
                               "modules_to_save ['score'] are not modules"),
    "modules_to_save without weights": (dict(config={"modules_to_save": ["lm_head"]}),
                                        "tensors the config saves but the file lacks: ['output.weight']"),
    "rank differs from config": (dict(config={"r": 8}),
                                 f"{Q0}.lora_A.weight has shape (4, 64) but the base model's "
                                 "layers.0.attention.wq.weight (64, 64) with r=8 needs (8, 64)"),
    "shape": (dict(tensors=lambda sd: sd.update({f"{Q0}.lora_B.weight": torch.zeros(32, 4)})),
              f"{Q0}.lora_B.weight has shape (32, 4) but the base model's layers.0.attention.wq.weight"),
    "nan": (dict(tensors=lambda sd: sd[f"{Q0}.lora_A.weight"].fill_(float("nan"))),
            f"{Q0}.lora_A.weight holds NaN or inf values"),
    "B missing": (dict(tensors=lambda sd: sd.pop(f"{Q0}.lora_B.weight")), f"{Q0}.lora_B.weight is missing"),
    "foreign tensor": (dict(tensors=lambda sd: sd.update({FOREIGN: torch.zeros(4, 64)})),
                       f"{FOREIGN} is not a tensor of a PEFT adapter for this Llama model"),
}


@pytest.fixture(scope="module")
def tiny_opened(tiny_ckpt):
    return open_checkpoint(tiny_ckpt)


@pytest.mark.parametrize("case", REFUSED)
def test_unsupported_or_mismatched_adapter_is_refused(case, adapters, tiny_opened, tmp_path):
    edit, message = REFUSED[case]
    bad = edited(adapters["plain"].path, tmp_path / "bad", **edit)
    with pytest.raises(CheckpointError) as err:
        open_adapter(bad, tiny_opened)
    assert message in str(err.value)


@pytest.mark.parametrize("case", ["no folder", "no config", "no weights", "truncated safetensors", "truncated bin"])
def test_missing_or_corrupt_files_are_refused(case, adapters, tiny_opened, tmp_path):
    src = adapters["patterns" if case == "truncated bin" else "plain"].path
    bad = tmp_path / "bad"
    if case != "no folder":
        shutil.copytree(src, bad)
    weights = next(bad.glob("adapter_model.*"), None)
    if case == "no config":
        (bad / "adapter_config.json").unlink()
    elif case == "no weights":
        weights.unlink()
    elif case.startswith("truncated"):
        weights.write_bytes(weights.read_bytes()[:-200])
    expected = {"no folder": (FileNotFoundError, "LoRA adapter folder"),
                "no config": (FileNotFoundError, "adapter_config.json is missing"),
                "no weights": (FileNotFoundError, "has neither adapter_model.safetensors nor adapter_model.bin"),
                "truncated safetensors": (CheckpointError, "adapter_model.safetensors could not be read"),
                "truncated bin": (CheckpointError, "adapter_model.bin could not be read")}[case]
    with pytest.raises(expected[0], match=expected[1]):
        open_adapter(bad, tiny_opened)


def test_adapter_is_refused_before_any_weight_is_read(tiny_ckpt, adapters, tmp_path, monkeypatch):
    from llama.checkpoint import MetaCheckpoint

    def no_reading(*args, **kwargs):
        raise AssertionError("weights were read before the adapter was validated")

    monkeypatch.setattr(MetaCheckpoint, "rank_tensors", no_reading)
    bad = edited(adapters["plain"].path, tmp_path / "bad", config={"target_modules": ["q_proj", "fc1"]})
    with pytest.raises(CheckpointError, match=r"target_modules \['fc1'\] are not modules"):
        build(tiny_ckpt, bad)


def test_int8_base_is_refused(tiny_ckpt, adapters, tmp_path):
    params = json.loads((tiny_ckpt / "params.json").read_text())
    write_checkpoint(tmp_path / "int8", params, quantize_state_dict(load_shard(tiny_ckpt / "consolidated.00.pth")))
    with pytest.raises(CheckpointError, match="is an int8 checkpoint: a LoRA adapter merges into float weights"):
        open_adapter(adapters["plain"].path, open_checkpoint(tmp_path / "int8"))
