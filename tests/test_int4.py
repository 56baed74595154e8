"""Weight-only int4: the portable layout, the CPU kernel against the plain path, quality on the real
stories260K, checkpoints that reshard and load at one copy, and bad input."""
import ctypes
import logging
import sys

import pytest
import torch

from conftest import resident_bytes, restart_peak_rss, run_python, teacher_forced, torchrun
from llama import Llama, ModelArgs
from llama.checkpoint import full_shapes, linear_inputs, load_shard, write_checkpoint, write_meta
from llama.errors import CheckpointError
from llama.hf import write_hf
from llama.loading import open_checkpoint
from llama.quantize import (CPUInt4Kernel, Int4Linear, Int8Linear, dequantize_int4, int4_kernel, pack_nibbles, plan,
                            quantize_int4, quantize_state_dict, unpack_nibbles, weight_bytes)

PROMPT = [1, 5, 9, 200, 31, 7, 64]


def _build(ckpt, **kwargs) -> Llama:
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=256, max_batch_size=2, device="cpu",
                       **kwargs)


def _logits(ckpt, **kwargs) -> torch.Tensor:
    return _build(ckpt, **kwargs).model(torch.tensor([PROMPT]), 0)


def _quantize(src, dst, group_size=None):
    """What scripts/quantize.py SRC DST --mode int4 [--group_size G] writes, in this process."""
    ckpt = open_checkpoint(src)
    layout = plan("int4", linear_inputs(ckpt.args, len(ckpt.files)), group_size)
    return write_checkpoint(dst, ckpt.params, quantize_state_dict(dict(ckpt.rank_tensors(0, 1)), layout),
                            num_shards=len(ckpt.files), tokenizer_path=src / "tokenizer.model")


def test_nibbles_hold_the_even_input_feature_high():
    q = torch.tensor([[1, 2, 15, 0], [0, 15, 7, 8]])
    assert pack_nibbles(q).tolist() == [[0x12, 0xF0], [0x0F, 0x78]]
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q.to(torch.uint8))


def test_groups_map_min_and_max_to_0_and_15():
    """Each group's own min/max span 0..15: (q - 8) * scale + zero recovers every value within half a
    step, a group's extremes exactly, and a constant group as it is."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 128, generator=gen) * torch.logspace(-3, 1, 8)[:, None]  # rows of very different ranges
    w[3, 32:64] = 0.25  # a constant group
    packed, scales, zeros = quantize_int4(w, 32)
    assert packed.shape == (8, 64) and packed.dtype == torch.uint8 and scales.shape == zeros.shape == (8, 4)
    groups = w.view(8, 4, 32)
    torch.testing.assert_close(scales, (groups.amax(-1) - groups.amin(-1)).clamp(min=1e-38) / 15)
    q = unpack_nibbles(packed).view(8, 4, 32)
    assert (q.amin(-1) == 0).all() and (q.amax(-1)[groups.amax(-1) > groups.amin(-1)] == 15).all()
    back = dequantize_int4(packed, scales, zeros, torch.float32)
    assert ((back - w).abs().view(8, 4, 32) <= scales[..., None] / 2 * 1.001 + 1e-7).all()
    torch.testing.assert_close(back.view(8, 4, 32).amin(-1), groups.amin(-1))
    assert (back[3, 32:64] == 0.25).all()


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_equals_the_plain_path(group_size, dtype):
    """_weight_int4pack_mm_for_cpu on the packed layout gives the dequantize-and-matmul result; 72 rows
    are padded to the kernel's multiple of 16, and 200 rows pack in several blocks."""
    gen = torch.Generator().manual_seed(group_size)
    for rows in (72, 200):
        weight, x = torch.randn(rows, 512, generator=gen), torch.randn(2, 3, 512, generator=gen).to(dtype)
        packed, scales, zeros = quantize_int4(weight, group_size)
        layer = Int4Linear.from_portable(packed.clone(), scales.to(dtype), zeros.to(dtype), group_size)
        plain = layer(x)
        layer.pack_(CPUInt4Kernel())
        padded = 80 if rows == 72 else 208
        assert layer.kernel.name == "cpu" and layer.scales_and_zeros.shape == (512 // group_size, padded, 2)
        got = layer(x)
        assert got.shape == (2, 3, rows) and got.dtype == dtype
        reference = x.double() @ dequantize_int4(packed, scales, zeros, torch.float64).T
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.double(), plain.double(), atol=tol * reference.abs().max().item(), rtol=0)
        torch.testing.assert_close(got.double(), reference, atol=tol * reference.abs().max().item(), rtol=0)


def test_a_model_without_the_kernel_falls_back_and_says_so(tiny_ckpt, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="llama.quantize"):
        kernel = _build(tiny_ckpt, quantize="int4")
    assert "int4: 9 layer(s) on the cpu kernel" in caplog.messages
    monkeypatch.setattr("llama.quantize.int4_kernel", lambda device, dtype: (None, "none here"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llama.quantize"):
        plain = _build(tiny_ckpt, quantize="int4")
    assert any(m.startswith("int4: no kernel (none here)") for m in caplog.messages)
    layer = plain.model.layers[0].feed_forward.w13
    assert isinstance(layer, Int4Linear) and layer.kernel is None and layer.weight.shape == (384, 32)
    assert kernel.model.layers[0].feed_forward.w13.kernel.name == "cpu"
    tokens = torch.tensor([PROMPT])
    torch.testing.assert_close(kernel.model(tokens, 0), plain.model(tokens, 0), atol=1e-4, rtol=1e-4)
    assert kernel.generate([PROMPT], max_gen_len=12, temperature=0) == plain.generate([PROMPT], max_gen_len=12,
                                                                                      temperature=0)


@pytest.mark.parametrize("group_size", [None, 32])
def test_int4_stories260k_quality(stories_ckpt, group_size, caplog):
    """Teacher-forced on the float32 model's greedy story: top-1 agreement >= 88%, perplexity within 8%.
    dim 64 takes groups of 64 (or 32); w2's 172 in-features take none, so w2 stays int8 and the log says so."""
    ref = _build(stories_ckpt)
    with caplog.at_level(logging.INFO, logger="llama.quantize"):
        q = _build(stories_ckpt, quantize="int4", group_size=group_size)
    fallback = "layers.*.feed_forward.w2 (5 layer(s), 172 in-features) fall back to int8"
    assert any(fallback in m for m in caplog.messages)
    ffn = q.model.layers[0].feed_forward
    assert isinstance(ffn.w13, Int4Linear) and ffn.w13.group_size == (group_size or 64) and ffn.w13.kernel.name == "cpu"
    assert isinstance(ffn.w2, Int8Linear) and isinstance(q.model.output, Int4Linear)
    agreement, ppl_ratio, _, _ = teacher_forced(ref, q, f"int4 (group size {group_size})")
    assert agreement >= 0.88
    assert abs(ppl_ratio - 1) <= 0.08
    assert weight_bytes(q.model) < 0.3 * weight_bytes(ref.model)  # 4-bit linears, 8-bit w2, the float32 embedding


def test_int4_checkpoint_equals_quantize_at_load(tiny_ckpt, tmp_path):
    out = tmp_path / "int4"
    proc = run_python("scripts/quantize.py", str(tiny_ckpt), str(out), "--mode", "int4", "--group_size", "32")
    assert proc.returncode == 0, proc.stderr
    shard = torch.load(out / "consolidated.00.pth", weights_only=True)
    wq = "layers.0.attention.wq"
    assert shard[wq + ".weight"].dtype == torch.uint8 and shard[wq + ".weight"].shape == (64, 32)
    assert shard[wq + ".group_scales"].shape == shard[wq + ".group_zeros"].shape == (64, 2)
    assert shard[wq + ".group_scales"].dtype == torch.float32 and f"{wq}.scales" not in shard
    at_load = _logits(tiny_ckpt, quantize="int4", group_size=32)
    loaded = _build(out)
    assert loaded.model.layers[1].attention.wqkv.kernel.name == "cpu"  # wq, wk, wv: rows of one layer
    torch.testing.assert_close(loaded.model(torch.tensor([PROMPT]), 0), at_load, atol=0, rtol=0)
    float_logits = _logits(tiny_ckpt)
    assert (at_load - float_logits).abs().max() < 0.25 * float_logits.abs().max()  # close, not equal
    assert not torch.allclose(at_load, float_logits, atol=1e-3)


def test_int4_checkpoints_reshard(tiny_ckpt, tiny_ckpt2, tmp_path):
    """Groups of 32 lie within each shard's half of wo and w2, so the model is the same on any split: a
    2-shard int4 checkpoint on 1 process, a 1-shard one on 2 processes, and quantizing at load on 2
    processes all give the 1-process int4 model."""
    one, two = _quantize(tiny_ckpt, tmp_path / "int4x1", 32), _quantize(tiny_ckpt2, tmp_path / "int4x2", 32)
    assert load_shard(two / "consolidated.01.pth")["layers.0.feed_forward.w2.group_scales"].shape == (64, 3)
    expected = _logits(tiny_ckpt, quantize="int4", group_size=32)
    merged = Llama.build(str(two), max_seq_len=256, max_batch_size=2, model_parallel_size=1)
    torch.testing.assert_close(merged.model(torch.tensor([PROMPT]), 0), expected, atol=1e-5, rtol=1e-5)
    split = write_meta(open_checkpoint(one, 2), tmp_path / "resharded", 2)  # scripts/reshard.py --num_shards 2
    torch.testing.assert_close(_logits(split), expected, atol=1e-5, rtol=1e-5)
    proc = torchrun(2, "tests/test_int4.py", str(one), str(tiny_ckpt2), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        from_ckpt, at_load = torch.load(tmp_path / f"out.rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(from_ckpt, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(at_load, expected, atol=1e-5, rtol=1e-5)


def test_loading_an_int4_checkpoint_holds_one_copy_of_its_bytes(tmp_path, tiny_ckpt):
    """Peak resident memory of Llama.build over the int4 bytes it loads (180 MB, nearly all nibbles): each
    layer is filled in place, then repacked for the kernel in place, a few blocks of rows at a time.
    Packing each layer into a new tensor (the freed ones are not all given back) makes it 1.15 or more."""
    params = {"dim": 2048, "n_layers": 6, "n_heads": 16, "vocab_size": 512, "multiple_of": 256}
    args = ModelArgs.from_params(params)
    layout = plan("int4", linear_inputs(args, 1))
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in full_shapes(args, layout).items():
        if name.endswith(".weight") and name[: -len(".weight")] in layout:
            state[name] = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        else:
            state[name] = torch.rand(shape, generator=gen) * 0.01
    write_checkpoint(tmp_path / "ckpt", params, state, tokenizer_path=tiny_ckpt / "tokenizer.model")
    del state
    int4_kernel(torch.device("cpu"), torch.float32)  # once per process: the kernel's check on a small layer
    # The state's tensors were small enough for the heap: hand their pages back, or the load reuses them
    # unseen and the peak reads low.
    ctypes.CDLL(None).malloc_trim(0)
    before = restart_peak_rss()
    model = Llama.build(str(tmp_path / "ckpt"), max_seq_len=16, max_batch_size=1, device="cpu").model
    assert model.layers[0].feed_forward.w13.kernel.name == "cpu"
    ratio = (resident_bytes("VmHWM") - before) / weight_bytes(model)
    print(f"peak RSS growth {ratio:.3f}x the {weight_bytes(model) / 1e6:.0f} MB of int4 weights")
    assert weight_bytes(model) > 170e6 and ratio < 1.1, ratio


def _corrupt(src, dst, name, value):
    """A copy of the int4 checkpoint `src` with one tensor replaced."""
    dst.mkdir()
    shard = load_shard(src / "consolidated.00.pth")
    torch.save({**shard, name: value}, dst / "consolidated.00.pth")
    (dst / "params.json").write_text((src / "params.json").read_text())
    return dst


def test_int4_bad_input(tiny_ckpt, tmp_path):
    for kwargs, message in [(dict(quantize="int4", group_size=48), "group_size=48 is not supported"),
                            (dict(quantize="int4", group_size=True), "group_size=True is not supported"),
                            (dict(quantize="int8", group_size=32), "applies to quantize='int4' only"),
                            (dict(quantize="int3"), "quantize='int3' is not supported")]:
        with pytest.raises(ValueError, match=message):
            _build(tiny_ckpt, **kwargs)
    with pytest.raises(ValueError, match="straddle ranks in layers.0.attention.wo: its 64 in-features are split "
                                         "over 2 shards or processes"):
        plan("int4", {"layers.0.attention.wo": (64, 2)}, 64)
    int4 = _quantize(tiny_ckpt, tmp_path / "int4")
    with pytest.raises(CheckpointError, match="int4 in groups of 64 of its 64 in-features, which 2 model-parallel "
                                              "processes would split inside a group"):
        open_checkpoint(int4, 2)
    with pytest.raises(CheckpointError, match=r"already quantized \(int4 \(group size 64\)\)"):
        _build(int4, quantize="int4")
    with pytest.raises(CheckpointError, match="is quantized .* a Hugging Face folder holds float weights"):
        write_hf(open_checkpoint(int4), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    shard = load_shard(int4 / "consolidated.00.pth")
    name = "layers.1.feed_forward.w2"
    cases = [(f"{name}.group_zeros", shard[f"{name}.group_zeros"][:, :2], r"group_zeros has shape \(64, 2\) but"),
             (f"{name}.group_scales", shard[f"{name}.group_scales"][:, :2], "give no supported group size"),
             (f"{name}.weight", shard[f"{name}.weight"].to(torch.int8), "is not \\(out, in/2\\) torch.uint8")]
    for i, (key, value, message) in enumerate(cases):
        with pytest.raises(CheckpointError, match=message):
            open_checkpoint(_corrupt(int4, tmp_path / f"bad{i}", key, value))
    proc = run_python("example.py", "--ckpt_dir", str(tiny_ckpt), "--quantize", "int4", "--group_size", "100")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: group_size=100 is not supported by the int4 kernels")
    proc = run_python("scripts/quantize.py", str(tiny_ckpt), str(tmp_path / "q"), "--mode", "int4",
                      "--group_size", "16")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and not (tmp_path / "q").exists()
    assert proc.stderr.strip().splitlines()[-1].startswith("error: group_size=16 is not supported")


if __name__ == "__main__":  # the torchrun worker of test_int4_checkpoints_reshard
    import torch.distributed as dist
    from pathlib import Path

    int4_dir, float_dir, out_prefix = map(Path, sys.argv[1:])
    logits = [_logits(int4_dir), _logits(float_dir, quantize="int4", group_size=32)]
    torch.save(logits, f"{out_prefix}.rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
