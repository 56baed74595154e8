"""Packed CPU linears (fbgemm): each kind against the plain path on small shapes, rows independent of
the batch and of the number of ranks, quality on the real stories260K, compiled decoding, and the
plain layers where fbgemm is missing."""
import logging
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import logits, teacher_forced, torchrun
from llama import Llama
from llama.quantize import (FBGEMM_OPS, Int8Linear, PackedLinear, absmax_scales, int8_linear, pack_linears_,
                            packed_fp16_linear, packed_int8_linear, packed_kernel, quantize_weight, weight_bytes)

PROMPT = [1, 5, 9, 200, 31, 7, 64]


def _build(ckpt, **kwargs) -> Llama:
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=256, max_batch_size=2, device="cpu",
                       **kwargs)


def _layer(out_features=200, in_features=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=gen) * 0.05, gen


@pytest.mark.parametrize("block_values", [96 * 64, 1 << 22])  # several blocks of rows, or one
def test_fp16_packing_equals_the_bf16_matmul(block_values):
    """bf16 weights are fp16 values: the packed layer gives the float32 product of bf16 activations and
    bf16 weights, rounded to bf16, as F.linear in bf16 does (within its rounding)."""
    weight, gen = _layer()
    w = weight.bfloat16()
    layer = packed_fp16_linear(w.clone(), block_values=block_values)
    assert len(layer.blocks) == (4 if block_values < 200 * 96 else 1)
    x = torch.randn(2, 3, 96, generator=gen).bfloat16()
    got = layer(x)
    assert got.shape == (2, 3, 200) and got.dtype == torch.bfloat16
    exact = x.double() @ w.double().T
    torch.testing.assert_close(got.double(), exact, atol=0, rtol=2 ** -8)  # one bf16 rounding
    plain = F.linear(x, w)
    torch.testing.assert_close(got.float(), plain.float(), atol=2e-2 * plain.abs().max().item(), rtol=0)


def test_fp16_packing_keeps_tiny_weights_within_fp16s_subnormal_step():
    w = torch.tensor([[1e-7, -3e-6, 2.5e-5, 1.0], [6e4, -1.5, 3e-8, 0.0]]).bfloat16()  # 6e4: fp16 holds it
    layer = packed_fp16_linear(w.clone())
    eye = torch.eye(4)
    got = layer(eye).T  # (out, in): the weight as the kernel holds it
    assert ((got - w.float()).abs() <= 2 ** -25).all()  # half the subnormal step, 2^-24
    assert torch.equal(got[:, 2:], w.float()[:, 2:]) or torch.equal(got[0, 3], w.float()[0, 3])


def test_int8_packing_tracks_the_weight_only_kernel():
    """Activations quantized to 7 bits per row: within 3% of each row's largest output of the int8
    weight-only product, whatever the rows' magnitudes."""
    weight, gen = _layer()
    scales = absmax_scales(weight)
    q = quantize_weight(weight, scales)
    layer = packed_int8_linear(q.clone(), scales, block_values=96 * 64)
    x = torch.randn(4, 96, generator=gen) * torch.tensor([[1.0], [1e3], [1e-3], [0.0]])
    got, plain = layer(x), int8_linear(x, q, scales)
    assert got.shape == (4, 200) and got.dtype == torch.float32
    assert torch.equal(got[3], torch.zeros(200))  # a zero row (a padding row) stays zero
    rows = plain[:3].abs().amax(-1, keepdim=True)
    assert ((got[:3] - plain[:3]).abs() <= 0.03 * rows).all()
    assert not torch.equal(got, plain)  # another kernel, not the plain one
    bf16 = layer(x[:3].bfloat16())
    assert bf16.dtype == torch.bfloat16 and ((bf16.float() - plain[:3]).abs() <= 0.04 * rows).all()


def test_a_rows_int8_result_does_not_depend_on_the_batch():
    """Each row is scaled to its own max and one row fixes fbgemm's scale: a row computed alone or
    beside rows a thousand times larger gives the same numbers."""
    weight, gen = _layer(out_features=64, in_features=160)
    scales = absmax_scales(weight)
    layer = packed_int8_linear(quantize_weight(weight, scales), scales)
    x = torch.randn(3, 160, generator=gen) * torch.tensor([[1.0], [1e3], [0.01]])
    batch = layer(x)
    for i in range(3):
        torch.testing.assert_close(layer(x[i : i + 1])[0], batch[i], atol=0, rtol=1e-6)


def test_pack_linears_packs_bf16_and_int8_layers_of_a_size(tiny_ckpt):
    """Default: layers under PACK_MIN_VALUES stay plain (all of the tiny model's do); min_values=0 packs
    each bf16 linear as fp16 and each int8 one, float32 ones never; the weight bytes grow by fbgemm's
    padding only."""
    tokens = torch.tensor([PROMPT])
    f32 = _build(tiny_ckpt)
    assert pack_linears_(f32.model, min_values=0) == {}
    reference = logits(f32.model, tokens)
    for dtype, kind, tol in (("bf16", "fp16", 0.05), ("float32", "int8", 0.03)):
        g = _build(tiny_ckpt, dtype=dtype, quantize=None if kind == "fp16" else "int8")
        assert pack_linears_(g.model) == {}
        before, plain = weight_bytes(g.model), logits(g.model, tokens)
        assert pack_linears_(g.model, min_values=0) == {kind: 9}  # 2 layers x (wqkv, wo, w13, w2), output
        layers = [m for m in g.model.modules() if isinstance(m, PackedLinear)]
        assert len(layers) == 9 and {m.kind for m in layers} == {kind}
        assert not any(isinstance(m, (torch.nn.Linear, Int8Linear)) for m in g.model.modules())
        per_value = 2 if kind == "fp16" else 1  # fbgemm pads in-features to a multiple of 512 with zeros
        padding = sum(m.out_features * (-m.in_features % 512) * per_value for m in layers)
        assert weight_bytes(g.model) == before + padding
        packed = logits(g.model, tokens)
        assert (packed - plain).abs().max() < tol * plain.abs().max()
        assert (packed - reference).abs().max() < tol * reference.abs().max()


def test_packed_int8_keeps_its_quality_on_stories260k(stories_ckpt):
    """Teacher-forced on the float32 model's greedy story, every int8 layer packed (activations 7 bits
    per row): the thresholds of the weight-only int8 test, top-1 agreement >= 97%, perplexity within 2%."""
    ref, q = _build(stories_ckpt), _build(stories_ckpt, quantize="int8")
    assert pack_linears_(q.model, min_values=0) == {"int8": 21}  # 5 x 4 linears and the output
    agreement, ppl_ratio, _, _ = teacher_forced(ref, q, "int8 packed")
    assert agreement >= 0.97
    assert abs(ppl_ratio - 1) <= 0.02


def test_packed_bf16_tracks_float32_on_stories260k(stories_ckpt):
    """The bf16 model with fp16-packed weights (float32 activations inside the matmul) follows float32
    at least as closely as the plain bf16 model: teacher-forced on float32's greedy story."""
    ref, plain, packed = _build(stories_ckpt), _build(stories_ckpt, dtype="bf16"), _build(stories_ckpt, dtype="bf16")
    assert pack_linears_(packed.model, min_values=0) == {"fp16": 21}
    plain_agreement, plain_ppl, _, _ = teacher_forced(ref, plain, "bf16 plain")
    agreement, ppl_ratio, ref_logits, logits = teacher_forced(ref, packed, "bf16 packed")
    assert agreement >= min(0.97, plain_agreement) and abs(ppl_ratio - 1) <= max(0.01, abs(plain_ppl - 1))
    assert (logits - ref_logits).abs().max() < 0.05 * ref_logits.abs().max()  # the bf16 tolerance of test_quantize


def test_without_fbgemm_the_layers_stay_plain_and_the_log_says_why(tiny_ckpt, monkeypatch, caplog):
    monkeypatch.setitem(FBGEMM_OPS, "int8", ("linear_prepack", "no_such_op"))
    packed_kernel.cache_clear()
    try:
        g = _build(tiny_ckpt, quantize="int8")
        plain = logits(g.model, torch.tensor([PROMPT]))
        with caplog.at_level(logging.WARNING, logger="llama.quantize"):
            assert pack_linears_(g.model, min_values=0) == {}
        assert any("int8 layers keep the plain path: this torch build has no torch.ops.quantized.no_such_op" in m
                   for m in caplog.messages)
        assert isinstance(g.model.layers[0].feed_forward.w13, Int8Linear)
        assert torch.equal(logits(g.model, torch.tensor([PROMPT])), plain)
    finally:
        packed_kernel.cache_clear()


def test_a_bf16_layer_past_fp16s_range_stays_plain(tiny_ckpt, caplog):
    g = _build(tiny_ckpt, dtype="bf16")
    with torch.no_grad():
        g.model.layers[0].feed_forward.w2.weight[0, 0] = 7e4
    with caplog.at_level(logging.INFO, logger="llama.quantize"):
        assert pack_linears_(g.model, min_values=0) == {"fp16": 8}
    assert isinstance(g.model.layers[0].feed_forward.w2, torch.nn.Linear)
    assert any("past fp16's 65504" in m for m in caplog.messages)


@pytest.mark.slow
def test_compiled_decode_calls_packed_layers(tiny_ckpt):
    """Under torch.compile a packed layer is one opaque op: the compiled decode gives eager's tokens
    (int8 on float32 activations; bf16, whose fused elementwise ops round otherwise, its first ones)."""
    prompts = [[1, 5, 9, 200, 31], [1, 77]]
    for dtype, quantize, n in (("float32", "int8", 12), ("bf16", None, 4)):
        eager, compiled = (_build(tiny_ckpt, dtype=dtype, quantize=quantize) for _ in range(2))
        for g in (eager, compiled):
            assert sum(pack_linears_(g.model, min_values=0).values()) == 9
        compiled.model.compile_()
        assert compiled.generate(prompts, max_gen_len=n, temperature=0) == eager.generate(prompts, max_gen_len=n,
                                                                                          temperature=0)
        assert compiled.model.compiled.by_width  # the decode steps ran compiled


@pytest.mark.slow
def test_two_ranks_pack_like_one(tiny_ckpt, tiny_ckpt2, tmp_path):
    """Row-parallel int8 layers quantize each activation row by its max over both ranks' parts: two
    processes hold the one-process packed model (int8 and bf16)."""
    proc = torchrun(2, "tests/test_packed.py", str(tiny_ckpt2), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for quantize, dtype in (("int8", "float32"), (None, "bf16")):
        one = _build(tiny_ckpt, quantize=quantize, dtype=dtype)
        pack_linears_(one.model, min_values=0)
        expected = logits(one.model, torch.tensor([PROMPT]))
        for rank in range(2):
            got = torch.load(tmp_path / f"out.{quantize}.rank{rank}.pt", weights_only=True)
            tol = 2e-2 if dtype == "bf16" else 1e-5  # bf16: the all-reduce adds rounded partial sums
            torch.testing.assert_close(got, expected, atol=tol * expected.abs().max().item(), rtol=0)


if __name__ == "__main__":  # the torchrun worker of test_two_ranks_pack_like_one
    import torch.distributed as dist
    from pathlib import Path

    ckpt, out_prefix = Path(sys.argv[1]), sys.argv[2]
    for quantize, dtype in (("int8", "float32"), (None, "bf16")):
        g = Llama.build(str(ckpt), max_seq_len=256, max_batch_size=2, device="cpu", quantize=quantize, dtype=dtype)
        counts = pack_linears_(g.model, min_values=0)
        assert counts == {"int8" if quantize else "fp16": 9}, counts
        torch.save(logits(g.model, torch.tensor([PROMPT])), f"{out_prefix}.{quantize}.rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
