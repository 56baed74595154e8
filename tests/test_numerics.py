"""NaN/inf in weights or activations are found and named."""
import pytest
import torch

from conftest import random_model
from llama import Llama, LogitsError
from llama.errors import NonFiniteError
from llama.numerics import all_finite, locate_nonfinite


def test_locate_names_the_first_module_that_overflows_in_float16():
    model, sd = random_model()
    model = model.half()
    model.setup_cache(dtype=torch.float16)
    tokens = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    assert locate_nonfinite(model, tokens) is None
    poisoned = {k: v.half() for k, v in sd.items()}
    poisoned["layers.1.feed_forward.w3.weight"] *= 1e5  # past float16's 65504
    model.load_state_dict(poisoned)
    assert locate_nonfinite(model, tokens).startswith("layers.1.feed_forward.w13 (Linear, torch.float16, max |x| = ")


def test_float16_overflow_during_generation_names_the_layer(tiny_ckpt):
    g = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=1,
                    dtype="float16")
    with torch.no_grad():
        g.model.layers[1].feed_forward.w13.weight.mul_(1e5)  # past float16's 65504
    with pytest.raises(LogitsError, match=r"row 0 at generation step 0: .* First non-finite output: "
                                          r"layers\.1\.feed_forward\.w13 \(Linear, torch\.float16, max \|x\| = inf\)"):
        g.text_completion(["The cat"], temperature=0, max_gen_len=4)


def test_checkpoint_with_nan_weights_is_refused_by_name(tiny_ckpt, tmp_path):
    from llama.checkpoint import load_shard, write_checkpoint
    import json

    sd = dict(load_shard(tiny_ckpt / "consolidated.00.pth"))
    sd["layers.0.attention.wk.weight"] = sd["layers.0.attention.wk.weight"].clone()
    sd["layers.0.attention.wk.weight"][0, 0] = float("nan")
    bad = write_checkpoint(tmp_path / "nan", json.loads((tiny_ckpt / "params.json").read_text()), sd,
                           tokenizer_path=tiny_ckpt / "tokenizer.model")
    with pytest.raises(NonFiniteError, match="layers.0.attention.wk.weight holds NaN or inf"):
        Llama.build(str(bad), max_seq_len=16, max_batch_size=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_value(dtype, bad):
    t = torch.randn(300, 70).to(dtype)
    assert all_finite(t)
    t[123, 45] = bad
    assert not all_finite(t)
    assert not all_finite(t[123:124, 40:50])  # a view


def test_all_finite_takes_integer_and_empty_tensors():
    assert all_finite(torch.full((4, 4), -127, dtype=torch.int8))
    assert all_finite(torch.empty(0, 8))
