"""The CUDA path gives the CPU path's logits and tokens. Skipped where there is no GPU (CI has none).

On a GPU host: `python -m pytest tests/test_cuda.py`.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import logits, torchrun
from cuda_worker import PROMPTS
from llama import Llama
from llama.quantize import GROUP_SIZES, CUDAInt4Kernel, Int4Linear, dequantize_int4, quantize_int4

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU on this machine; run `pytest tests/test_cuda.py` on a GPU host")

PUBLISHED = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def _build(ckpt, **kwargs) -> Llama:
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=256, max_batch_size=3, **kwargs)


def _story(ref: Llama) -> torch.Tensor:
    """The float32 model's greedy story, (1, T) with BOS: the text that lower precisions are scored on."""
    story, _ = ref.generate([[ref.tokenizer.bos_id]], max_gen_len=255, temperature=0)
    return torch.tensor([[ref.tokenizer.bos_id] + story[0]])


def test_default_device_and_dtype(tiny_ckpt):
    g = _build(tiny_ckpt)
    weight = g.model.layers[0].attention.wqkv.weight
    assert weight.device.type == "cuda"
    assert weight.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert g.model.layers[0].attention.cache_k.device.type == "cuda"


def test_float32_logits_and_tokens_match_cpu(tiny_ckpt):
    cpu, gpu = _build(tiny_ckpt, device="cpu"), _build(tiny_ckpt, device="cuda", dtype="float32")
    tokens = torch.tensor([PROMPTS[0]])
    torch.testing.assert_close(logits(gpu.model, tokens.cuda()).cpu(), logits(cpu.model, tokens), atol=2e-4, rtol=2e-4)
    expected = cpu.generate(PROMPTS, max_gen_len=24, temperature=0, logprobs=True)
    got = gpu.generate(PROMPTS, max_gen_len=24, temperature=0, logprobs=True)
    assert got[0] == expected[0]
    torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(expected[1]), atol=1e-3, rtol=1e-3)


def test_stories260k_greedy_sample_on_gpu(stories_ckpt):
    g = _build(stories_ckpt, device="cuda", dtype="float32")
    tokens, _ = g.generate([[g.tokenizer.bos_id]], max_gen_len=40, temperature=0)
    assert g.tokenizer.decode(tokens[0]).startswith(PUBLISHED)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_half_precision_tracks_float32(stories_ckpt, dtype, quantize):
    """Teacher-forced on the float32 story: top-1 agreement >= 97% and perplexity within 2%."""
    ref = _build(stories_ckpt, device="cuda", dtype="float32")
    low = _build(stories_ckpt, device="cuda", dtype=dtype, quantize=quantize)
    tokens = _story(ref).cuda()
    ref_logits, low_logits = logits(ref.model, tokens)[0, :-1], logits(low.model, tokens)[0, :-1]
    assert low_logits.dtype == torch.float32 and torch.isfinite(low_logits).all()
    agreement = (ref_logits.argmax(-1) == low_logits.argmax(-1)).float().mean().item()
    ppl_ref, ppl_low = (F.cross_entropy(x, tokens[0, 1:]).exp().item() for x in (ref_logits, low_logits))
    print(f"{dtype} quantize={quantize}: top-1 agreement {agreement:.2%}, perplexity {ppl_low:.4f} vs {ppl_ref:.4f}")
    assert agreement >= 0.97 and abs(ppl_low / ppl_ref - 1) <= 0.02


def test_int8_on_gpu_matches_int8_on_cpu(tiny_ckpt):
    cpu = _build(tiny_ckpt, device="cpu", quantize="int8")
    gpu = _build(tiny_ckpt, device="cuda", dtype="float32", quantize="int8")
    assert gpu.model.layers[0].attention.wqkv.weight.dtype == torch.int8
    tokens = torch.tensor([PROMPTS[0]])
    torch.testing.assert_close(logits(gpu.model, tokens.cuda()).cpu(), logits(cpu.model, tokens), atol=2e-4, rtol=2e-4)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, quantize", [("float32", None), ("bf16", None), ("float32", "int8"), ("bf16", "int4")])
def test_compiled_decode_matches_eager(tiny_ckpt, dtype, quantize):
    """CUDA graphs replay the compiled step."""
    eager = _build(tiny_ckpt, device="cuda", dtype=dtype, quantize=quantize)
    compiled = _build(tiny_ckpt, device="cuda", dtype=dtype, quantize=quantize, compile=True)
    expected = eager.generate(PROMPTS, max_gen_len=24, temperature=0, logprobs=True)
    got = compiled.generate(PROMPTS, max_gen_len=24, temperature=0, logprobs=True)
    tol = 1e-3 if dtype == "float32" else 5e-2
    torch.testing.assert_close(torch.tensor(got[1][0][:4]), torch.tensor(expected[1][0][:4]), atol=tol, rtol=tol)
    if dtype == "float32":  # bf16 rounding may flip a near-tie on random weights; float32 must agree
        assert got[0] == expected[0]
    # another number of rows runs another bucket; the same number again reuses its graph
    again = compiled.generate(PROMPTS[:1], max_gen_len=24, temperature=0)[0]
    assert again[0] == compiled.generate(PROMPTS[:1], max_gen_len=24, temperature=0)[0][0]


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_int4_kernel_on_gpu_equals_the_plain_path(group_size):
    """_weight_int4pack_mm on its tiled layout gives the dequantize-and-matmul result: 100 rows padded to
    the kernel's multiple of 8, in-features that take 2, 4 and 8 inner k-tiles."""
    gen = torch.Generator().manual_seed(group_size)
    for in_features in sorted({3 * group_size, 2 * group_size, 4 * group_size}):
        weight = torch.randn(100, in_features, generator=gen)
        x = torch.randn(5, in_features, generator=gen).cuda().bfloat16()
        packed, scales, zeros = (t.cuda() for t in quantize_int4(weight, group_size))
        layer = Int4Linear.from_portable(packed.clone(), scales.bfloat16(), zeros.bfloat16(), group_size)
        plain = layer(x).float()
        layer.pack_(CUDAInt4Kernel())
        got = layer(x)
        assert got.shape == (5, 100) and got.dtype == torch.bfloat16
        reference = x.double() @ dequantize_int4(packed, scales, zeros, torch.float64).T
        tol = 2e-2 * reference.abs().max().item()
        torch.testing.assert_close(got.double(), reference, atol=tol, rtol=0)
        torch.testing.assert_close(got.float(), plain, atol=tol, rtol=0)


def test_int4_on_gpu_tracks_float32(stories_ckpt, caplog):
    """bf16 activations run the CUDA int4 kernel, within the CPU's bf16 int4 quality of float32 (teacher-
    forced: top-1 agreement >= 85%, perplexity within 10%); fp16 has no kernel: the plain path, logged."""
    ref = _build(stories_ckpt, device="cuda", dtype="float32")
    q = _build(stories_ckpt, device="cuda", dtype="bf16", quantize="int4")
    assert q.model.layers[0].attention.wqkv.kernel.name == "cuda"
    tokens = _story(ref).cuda()
    ref_logits, q_logits = logits(ref.model, tokens)[0, :-1], logits(q.model, tokens)[0, :-1]
    agreement = (ref_logits.argmax(-1) == q_logits.argmax(-1)).float().mean().item()
    ppl_ref, ppl_q = (F.cross_entropy(x, tokens[0, 1:]).exp().item() for x in (ref_logits, q_logits))
    print(f"int4 bf16: top-1 agreement {agreement:.2%}, perplexity {ppl_q:.4f} vs {ppl_ref:.4f}")
    assert agreement >= 0.85 and abs(ppl_q / ppl_ref - 1) <= 0.10
    with caplog.at_level("WARNING", logger="llama.quantize"):
        fp16 = _build(stories_ckpt, device="cuda", dtype="fp16", quantize="int4")
    assert fp16.model.layers[0].attention.wqkv.kernel is None
    assert any("takes bf16 activations" in m for m in caplog.messages)
    assert torch.isfinite(logits(fp16.model, tokens)).all()


def test_kv_cache_larger_than_the_gpu_is_refused_before_allocating(tiny_ckpt):
    free = torch.cuda.mem_get_info()[0]
    with pytest.raises(MemoryError, match="KV cache"):
        Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=2048,
                    max_batch_size=free // 2048 // 100, device="cuda")  # 256 bytes per slot: 2.5x free


def _nccl_run(ckpt, nproc: int, tmp_path) -> dict:
    out = tmp_path / f"nccl{nproc}"
    proc = torchrun(nproc, "tests/cuda_worker.py", str(ckpt), str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / f"nccl{nproc}.rank0.json").read_text())


@pytest.mark.slow
def test_nccl_one_process_matches_cpu(tiny_ckpt, tmp_path):
    result = _nccl_run(tiny_ckpt, 1, tmp_path)
    assert result["backend"] == "nccl"
    cpu = _build(tiny_ckpt, device="cpu")
    assert result["greedy"] == cpu.generate(PROMPTS, max_gen_len=16, temperature=0)[0]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="model parallelism over nccl needs 2 GPUs")
def test_nccl_two_gpus_match_one(tiny_ckpt2, tmp_path):
    one, two = _nccl_run(tiny_ckpt2, 1, tmp_path), _nccl_run(tiny_ckpt2, 2, tmp_path)
    assert two["backend"] == "nccl" and two["greedy"] == one["greedy"]
