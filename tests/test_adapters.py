"""PEFT LoRA adapters loaded unmerged (llama.adapters): each request's rows get its own adapter's update,
with peft's own model as the reference; mixed batches; loading and unloading while requests run; the
prefix cache kept apart per adapter; compiled decode; two processes equal to one."""
import re
import threading
import warnings
from pathlib import Path
from typing import Dict, List, NamedTuple

import pytest
import torch

from conftest import logits, run_python, torchrun
from llama import Llama
from llama.adapters import AdaptedLinear
from llama.errors import CheckpointError
from llama.hf import write_hf
from llama.loading import open_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "all": dict(r=4, lora_alpha=8, target_modules=PROJECTIONS),
    # PEFT's default for Llama: q and v only (k, wo, w13, w2 untouched), with rsLoRA scaling
    "qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
    # per-module ranks and alphas; the embedding and lm_head adapted (PEFT saves their base weights too)
    "patterns": dict(r=4, lora_alpha=8, target_modules=PROJECTIONS + ["embed_tokens", "lm_head"],
                     rank_pattern={"q_proj": 2, "^model.layers.1.mlp.down_proj": 6},
                     alpha_pattern={"layers.0.self_attn.k_proj": 3.0, "lm_head": 5}),
    # only layer 1, and not its k_proj
    "subset": dict(r=2, lora_alpha=4, target_modules=PROJECTIONS, layers_to_transform=[1], exclude_modules=["k_proj"]),
}
TOKENS = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
PROMPTS = ["The cat sat on the", "Then the brave little girl ran into the dark forest and"]


class Reference(NamedTuple):
    path: Path
    logits: torch.Tensor  # peft's model on TOKENS
    greedy: List[List[int]]  # peft's greedy continuation of each of PROMPTS, up to EOS


@pytest.fixture(scope="module")
def hf_base(tiny_ckpt, tmp_path_factory) -> Path:
    return write_hf(open_checkpoint(tiny_ckpt), tmp_path_factory.mktemp("adapters") / "hf_base")


def peft_model(hf_base: Path, seed: int, **config):
    """peft's model of `config` on the base, its factors drawn by peft (init_lora_weights=False) from seed."""
    base = transformers.LlamaForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    with warnings.catch_warnings(), torch.random.fork_rng():  # the caller's RNG kept
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        return peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **config)).eval()


@pytest.fixture(scope="module")
def refs(hf_base, tiny_ckpt, tmp_path_factory) -> Dict[str, Reference]:
    from llama.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_ckpt / "tokenizer.model")
    out = {}
    for seed, (name, config) in enumerate(CONFIGS.items()):
        model = peft_model(hf_base, seed, **config)
        with torch.no_grad():
            ref_logits = model(TOKENS).logits
            greedy = []
            for prompt in PROMPTS:
                ids = tok.encode(prompt, bos=True, eos=False)
                new = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                     max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_id,
                                     pad_token_id=tok.eos_id)[0, len(ids):].tolist()
                greedy.append(new[: new.index(tok.eos_id)] if tok.eos_id in new else new)
        path = tmp_path_factory.mktemp("adapters") / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True"
            model.save_pretrained(path)
        out[name] = Reference(path, ref_logits, greedy)
    assert (out["patterns"].path / "adapter_model.safetensors").is_file()
    return out


def build(base, **kwargs) -> Llama:
    return Llama.build(str(base), **{"max_seq_len": 64, "max_batch_size": 4, "model_parallel_size": 1, **kwargs})


@pytest.fixture(scope="module")
def g(tiny_ckpt, refs) -> Llama:
    """The tiny base with every reference adapter loaded unmerged."""
    return build(tiny_ckpt, max_batch_size=5, adapters={name: ref.path for name, ref in refs.items()})


@pytest.fixture(scope="module")
def base_logits(tiny_ckpt) -> torch.Tensor:
    return logits(build(tiny_ckpt).model, TOKENS)


def adapter_logits(g: Llama, tokens: torch.Tensor, slots: List[int]) -> torch.Tensor:
    """The model's logits with row b under adapter slot slots[b] (0: none), each row in blocks of its own."""
    return g.model(tokens, *g.model.layout(tokens.shape[0], 0, tokens.shape[1]), torch.tensor(slots))


def slot(g: Llama, name: str) -> int:
    return g.engine.adapters.by_name[name].slot


def greedy(g: Llama, adapter=None) -> List[List[int]]:
    return [g.generate([g.tokenizer.encode(p, bos=True, eos=False)], max_gen_len=10, temperature=0,
                       adapter=adapter)[0][0] for p in PROMPTS]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unmerged_adapter_equals_peft(name, g, refs, base_logits):
    ref = refs[name]
    assert (ref.logits - base_logits).abs().max() > 0.1  # the adapter really changes the model
    got = adapter_logits(g, TOKENS, [slot(g, name)] * 2)
    assert (got - ref.logits).abs().max().item() < 1e-4
    assert greedy(g, adapter=name) == ref.greedy


def test_unmerged_adapter_on_a_hugging_face_base(hf_base, refs):
    """q/k rows are in rotate-half order in Hugging Face files: the adapter fits the base either way."""
    g = build(hf_base, adapters={"patterns": refs["patterns"].path})
    assert (adapter_logits(g, TOKENS, [1, 1]) - refs["patterns"].logits).abs().max().item() < 1e-4


def test_unmerged_equals_merged(tiny_ckpt, g, refs):
    merged = build(tiny_ckpt, lora=str(refs["subset"].path))
    torch.testing.assert_close(adapter_logits(g, TOKENS, [slot(g, "subset")] * 2), logits(merged.model, TOKENS),
                               atol=1e-4, rtol=0)
    assert greedy(g, adapter="subset") == greedy(merged)


def test_a_mixed_batch_gives_each_row_its_own_adapter(g, refs, base_logits):
    """One forward: a base row and a row per adapter. Each adapter row equals peft's; the base row equals
    the base model's exactly (its update is a sum of zeros)."""
    names = list(CONFIGS)
    tokens = TOKENS[:1].expand(1 + len(names), -1)
    got = adapter_logits(g, tokens, [0] + [slot(g, n) for n in names])
    assert torch.equal(got[0], logits(g.model, TOKENS[:1])[0])
    torch.testing.assert_close(got[0], base_logits[0], atol=1e-5, rtol=0)
    for i, name in enumerate(names, start=1):
        assert (got[i] - refs[name].logits[0]).abs().max().item() < 1e-4, name


def test_requests_for_different_adapters_share_steps(g, refs):
    """Four requests submitted together (the base and three adapters) decode in the same steps, each
    with the tokens it gets alone."""
    ids = g.tokenizer.encode(PROMPTS[1], bos=True, eos=False)
    adapters = [None, "all", "qv", "patterns"]
    alone = [g.generate([ids], max_gen_len=10, temperature=0, adapter=a)[0][0] for a in adapters]
    assert alone[1:] == [refs[a].greedy[1] for a in adapters[1:]]
    assert len({tuple(t) for t in alone}) == 4  # four different answers
    before = g.engine.stats.steps
    together = [g.submit(ids, 10, temperature=0, adapter=a) for a in adapters]
    assert [c.wait().tokens for c in together] == alone
    assert g.engine.stats.steps - before <= max(len(t) for t in alone) + 1  # one prefill, then shared decodes


def test_scoring_with_an_adapter(g, tiny_ckpt, refs):
    merged = build(tiny_ckpt, lora=str(refs["all"].path))
    pairs = [("The cat", " sat on the mat"), ("A", " dog")]
    got, want = g.score(pairs, adapter="all"), merged.score(pairs)
    for a, b in zip(got, want):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and a.is_greedy == b.is_greedy
    assert g.score(pairs)[0].logprob != pytest.approx(got[0].logprob, abs=1e-3)


def test_memory_per_adapter_is_its_own_size(tiny_ckpt, refs, tmp_path):
    """The slots hold each adapter's factors and nothing more, whatever their ranks, when each adapts all
    the fused parts of a layer it touches; one that adapts q and v only is padded in k (zero rows of its
    rank), where another adapter adapts k."""
    from llama.tiny import write_random_adapter

    g = build(tiny_ckpt)
    rank8 = write_random_adapter(tmp_path / "rank8", g.model.params, r=8)

    def slot_bytes() -> int:
        return sum(t.numel() * t.element_size() for m in g.model.modules() if isinstance(m, AdaptedLinear)
                   for n, t in m.named_buffers(recurse=False) if n in ("down", "up"))

    own = factor_bytes({"all": refs["all"].path, "rank8": rank8, "qv": refs["qv"].path})
    g.load_adapter("all", refs["all"].path)
    assert slot_bytes() == own["all"]
    g.load_adapter("rank8", rank8)
    assert slot_bytes() == own["all"] + own["rank8"]
    g.load_adapter("qv", refs["qv"].path)
    p = g.model.params
    k_padding = p.n_layers * 8 * (p.dim + p.n_kv_heads * p.head_dim) * 4
    assert slot_bytes() == own["all"] + own["rank8"] + own["qv"] + k_padding


def factor_bytes(paths) -> Dict[str, int]:
    """Each adapter's LoRA factors, in float32."""
    from safetensors import safe_open

    out = {}
    for name, path in paths.items():
        with safe_open(str(Path(path) / "adapter_model.safetensors"), "pt") as f:
            out[name] = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] * 4 for k in f.keys()
                            if "lora_" in k)
    return out


def test_prefix_cache_is_kept_apart_per_adapter_and_per_load(tiny_ckpt, refs):
    g = build(tiny_ckpt, adapters={"all": refs["all"].path, "qv": refs["qv"].path})
    ids = g.tokenizer.encode(" ".join(["the brave little girl ran into the dark forest"] * 4), bos=True, eos=False)
    assert len(ids) > 2 * 16

    def run(adapter):
        c = g.submit(ids, 4, temperature=0, adapter=adapter).wait()
        return c.cached_tokens, c.tokens

    first = run("all")
    assert first[0] == 0
    assert run("all") == (32, first[1])  # its own blocks again
    assert run("qv")[0] == 0  # another adapter's keys and values are not its own
    assert run(None)[0] == 0 and run(None)[0] == 32
    g.load_adapter("all", refs["all"].path)  # loaded again: a new salt
    assert run("all") == (0, first[1])


def test_load_and_unload_while_requests_run(tiny_ckpt, refs):
    g = build(tiny_ckpt, adapters={"all": refs["all"].path})
    ids = g.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    alone = g.generate([ids], max_gen_len=40, temperature=0, adapter="all")[0][0]
    free_slots = list(g.engine.adapters.free)

    running = g.submit(ids, 40, temperature=0, adapter="all")
    deltas = iter(running)
    next(deltas)
    g.load_adapter("qv", refs["qv"].path)  # while "all" decodes: it takes a slot between two steps
    g.load_adapter("all", refs["patterns"].path)  # the name now means other weights...
    g.unload_adapter("qv")
    assert not running.request.done
    with pytest.raises(ValueError, match=r"adapter='qv' is not loaded \(loaded adapters: 'all'\)"):
        g.generate([ids], max_gen_len=2, adapter="qv")
    old = running.request.adapter_entry
    assert old.retired and old.slot not in g.engine.adapters.free  # held by the running request
    for _ in deltas:
        pass
    assert running.tokens == alone  # ... but what ran keeps the weights it started with
    assert old.slot in g.engine.adapters.free  # freed with its last request
    assert g.generate([ids], max_gen_len=10, temperature=0, adapter="all")[0][0] == refs["patterns"].greedy[0]
    g.load_adapter("again", refs["all"].path)  # reuses a freed slot: no new memory
    assert g.engine.adapters.slots == 3 and free_slots == []
    assert g.generate([ids], max_gen_len=40, temperature=0, adapter="again")[0][0] == alone


def test_loads_from_threads_while_others_stream(tiny_ckpt, refs):
    """Loads and unloads from other threads while streams run: every stream gets its tokens, each load
    is usable once it returns."""
    g = build(tiny_ckpt, adapters={"all": refs["all"].path})
    ids = g.tokenizer.encode(PROMPTS[1], bos=True, eos=False)
    alone = g.generate([ids], max_gen_len=30, temperature=0, adapter="all")[0][0]
    qv_alone = greedy(build(tiny_ckpt, lora=str(refs["qv"].path)))[1]
    errors, results = [], {}

    def loader(i: int):
        try:
            g.load_adapter(f"qv{i}", refs["qv"].path)
            results[i] = g.generate([ids], max_gen_len=10, temperature=0, adapter=f"qv{i}")[0][0]
            g.unload_adapter(f"qv{i}")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    streams = [g.submit(ids, 30, temperature=0, adapter="all") for _ in range(2)]
    threads = [threading.Thread(target=loader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [s.wait().tokens for s in streams] == [alone, alone]
    assert results == {i: qv_alone for i in range(3)}
    assert g.adapters == {"all": str(refs["all"].path)}


BAD = {  # case: (adapter config, edit, part of the error)
    "modules_to_save": (dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]), None,
                        "modules_to_save replaces ['output.weight'] whole, which requests without this adapter "
                        "cannot share: load it merged instead"),
    "resized embedding": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"]), "embedding",
                          "its tok_embeddings.weight differs from the base model's"),
    "dora": (dict(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True), None,
             "use_dora=True is not supported (DoRA"),
    "absent targets": (dict(r=4, lora_alpha=8, target_modules=["q_proj"]), "targets",
                       "target_modules ['fc1'] are not modules of this Llama model"),
    "shape": (dict(r=4, lora_alpha=8, target_modules=["q_proj"]), "shape",
              "lora_B.weight has shape (32, 4) but the base model's layers.0.attention.wq.weight"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_adapters_are_refused_and_leave_nothing_behind(case, hf_base, tiny_ckpt, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    config, edit, message = BAD[case]
    path = tmp_path / case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model(hf_base, 0, **config).save_pretrained(path)
    weights = path / "adapter_model.safetensors"
    if edit == "embedding":  # a trained (or resized) embedding, saved whole
        state = load_file(weights)
        state["base_model.model.model.embed_tokens.base_layer.weight"] += 0.5
        save_file(state, weights)
    elif edit == "targets":
        cfg = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "fc1"]}))
    elif edit == "shape":
        state = load_file(weights)
        state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 4)
        save_file(state, weights)
    g = build(tiny_ckpt)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        g.load_adapter("bad", path)
    assert g.adapters == {} and g.engine.adapters.slots == 0
    assert not any(isinstance(m, AdaptedLinear) for m in g.model.modules())


def test_bad_names_and_arguments(g):
    with pytest.raises(ValueError, match=r"adapter='nope' is not loaded \(loaded adapters: 'all', 'patterns', "
                                         r"'qv', 'subset'\): load it with Llama.load_adapter"):
        g.text_completion(["The cat"], adapter="nope")
    for call in (lambda: g.chat_completion([[{"role": "user", "content": "Hi"}]], adapter="nope"),
                 lambda: g.score([("A", " b")], adapter="nope"), lambda: g.submit([1, 5], 3, adapter="nope"),
                 lambda: g.unload_adapter("nope")):
        with pytest.raises(ValueError, match="adapter='nope' is not loaded"):
            call()
    with pytest.raises(ValueError, match="adapter name '' must be a non-empty printable string"):
        g.load_adapter("", "somewhere")
    with pytest.raises(TypeError, match="adapter path 3 must be a folder path"):
        g.load_adapter("x", 3)
    with pytest.raises(FileNotFoundError, match="LoRA adapter folder '/nowhere' does not exist"):
        g.load_adapter("x", "/nowhere")
    with pytest.raises(TypeError, match="adapters must be a dict of names to PEFT adapter folders"):
        Llama.build("/unused", adapters=["a"])
    assert set(g.adapters) == set(CONFIGS)


def test_quantized_base(tiny_ckpt, refs, base_logits):
    """On an int8 base the adapter's update runs in float beside the int8 weights: near peft's model, and
    far nearer than the int8 base alone. An lm_head copy cannot be checked against int8 weights: refused."""
    g = build(tiny_ckpt, quantize="int8", adapters={"all": refs["all"].path})
    ref = refs["all"].logits
    got = adapter_logits(g, TOKENS, [1, 1])
    assert (got - ref).abs().max() < 0.1 * (logits(g.model, TOKENS) - ref).abs().max()
    with pytest.raises(CheckpointError, match="cannot be checked against this model's quantized or packed one"):
        g.load_adapter("patterns", refs["patterns"].path)


def test_a_bf16_model_on_a_cpu_computes_the_update_in_float32(tiny_ckpt, refs):
    """16-bit matmuls are slow on CPUs: the factors are float32 there, the update is added in bf16, and the
    result is as near peft's float32 model as the bf16 base is to the float32 one."""
    g = build(tiny_ckpt, dtype="bf16", adapters={"all": refs["all"].path})
    layers = [m for m in g.model.modules() if isinstance(m, AdaptedLinear)]
    assert {m.down.dtype for m in layers} == {torch.float32} and g.model.norm.weight.dtype == torch.bfloat16
    got = adapter_logits(g, TOKENS, [1, 1])
    assert got.dtype == torch.float32  # the logits, as always
    base_error = (logits(g.model, TOKENS) - logits(build(tiny_ckpt).model, TOKENS)).abs().max()
    assert (got - refs["all"].logits).abs().max() < 2 * base_error


def test_packed_base(tiny_ckpt, refs):
    """Over fbgemm's packed int8 linears (llama.quantize.pack_linears_), the adapter's update is the same as
    over the plain int8 ones, and a base row in the same batch is the packed base's own."""
    from llama.quantize import PackedLinear, pack_linears_

    plain = build(tiny_ckpt, quantize="int8", adapters={"all": refs["all"].path})
    packed = build(tiny_ckpt, quantize="int8")
    if pack_linears_(packed.model, min_values=0) != {"int8": 9}:
        pytest.skip("fbgemm's packed int8 linears are not usable here")
    packed.load_adapter("all", refs["all"].path)
    assert sum(isinstance(m, PackedLinear) for m in packed.model.modules()) == 9
    tokens = TOKENS[:1].expand(2, -1)
    want, got = adapter_logits(plain, tokens, [1, 0]), adapter_logits(packed, tokens, [1, 0])
    tol = 0.03 * want.abs().max()
    assert (got - want).abs().max() < tol
    assert ((got[0] - got[1]) - (want[0] - want[1])).abs().max() < 2 * tol  # the update (two rows' packing errors)
    assert torch.equal(got[1], logits(packed.model, TOKENS[:1])[0])


@pytest.mark.slow
def test_compiled_decode_with_adapters(tiny_ckpt, refs):
    """The compiled decode step takes adapter rows (a graph of its own), keeps its graphs when a load
    reuses a slot, and compiles again when a load needs a new one."""
    eager = build(tiny_ckpt, adapters={"all": refs["all"].path, "qv": refs["qv"].path})
    compiled = build(tiny_ckpt, compile=True, adapters={"all": refs["all"].path, "qv": refs["qv"].path})
    ids = [g.tokenizer.encode(p, bos=True, eos=False) for g in [eager] for p in PROMPTS]

    def mixed(g, adapters):
        return [c.wait().tokens for c in [g.submit(ids[i % 2], 12, temperature=0, adapter=a)
                                            for i, a in enumerate(adapters)]]

    first = mixed(compiled, ["all", None, "qv", "all"])
    assert first == mixed(eager, ["all", None, "qv", "all"])
    graphs = compiled.model.compiled
    compiled.unload_adapter("qv"), eager.unload_adapter("qv")
    compiled.load_adapter("p", refs["patterns"].path), eager.load_adapter("p", refs["patterns"].path)
    assert compiled.model.compiled is not graphs  # "patterns" adapts the embedding and lm_head: new shapes
    assert mixed(compiled, ["p", "all", None, "p"]) == mixed(eager, ["p", "all", None, "p"])
    graphs = compiled.model.compiled
    compiled.unload_adapter("p"), eager.unload_adapter("p")
    compiled.load_adapter("s", refs["subset"].path), eager.load_adapter("s", refs["subset"].path)
    assert compiled.model.compiled is graphs  # the same slot, shapes unchanged: the graphs stay
    assert mixed(compiled, ["s", "all", None, "s"]) == mixed(eager, ["s", "all", None, "s"])


@pytest.mark.slow
def test_two_processes_equal_one(tiny_ckpt, tiny_ckpt2, refs, tmp_path):
    """Two ranks: adapters registered at build (every rank alike), then, while serve_forever runs, one
    loaded through rank 0 alone (rank 1 opens it when the plan says), one that rank 1 fails to open
    (refused on both), an unload. Every rank's logits and rank 0's tokens equal one process's."""
    paths = [str(refs[n].path) for n in ("patterns", "qv")]
    proc = torchrun(2, "tests/adapter_worker.py", str(tiny_ckpt2), str(tmp_path / "out"), *paths, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"out.rank{r}.pt", weights_only=True) for r in range(2)]
    one = build(tiny_ckpt, adapters={"a": paths[0], "b": paths[1]})
    tokens = torch.tensor([one.tokenizer.encode(PROMPTS[0], bos=True, eos=False)] * 2)
    want = adapter_logits(one, tokens, [0, 1])
    for rank in ranks:
        torch.testing.assert_close(rank["logits"], want, atol=1e-5, rtol=1e-5)
    assert ranks[0]["spmd"] == [one.text_completion(PROMPTS, temperature=0, max_gen_len=12, adapter=a)
                                for a in (None, "a")]
    ids = one.tokenizer.encode(PROMPTS[1], bos=True, eos=False)
    assert ranks[0]["served"] == [one.generate([ids], max_gen_len=12, temperature=0, adapter=a)[0][0]
                                  for a in (None, "a", "b")]
    assert "rank 1: OSError: rank 1 cannot read" in ranks[0]["refused"]


@pytest.mark.slow
def test_benchmark_lora_mix(tmp_path):
    import json

    proc = run_python("scripts/benchmark.py", "--shape", "tiny", "--lora_mix", "1,2", "--prompt_len", "4",
                      "--gen_len", "4", "--rounds", "1", "--json", "--cache_dir", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert [row["adapters"] for row in report["lora_mix"]] == [1, 2]
    for row in report["lora_mix"]:
        assert row["rows"] == 16 and row["rows_changed"] >= 4  # the adapters' updates ran (9 of 16 here)
        assert row["base"]["decode_tok_s_total"] > 0 and row["mix"]["decode_tok_s_total"] > 0
        assert row["ratio"]["decode_tok_s_total"]["min"] > 0
        assert row["memory"]["ratio"] == pytest.approx(1.0)  # the slots hold the adapters' own factors, no more
