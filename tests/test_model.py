import pytest
import torch

from conftest import logits, random_model
from llama.hf import meta_to_hf


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_incremental_decoding_matches_full_forward(n_kv_heads):
    model, _ = random_model(n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    full = logits(model, tokens)

    steps = [logits(model, tokens[:, :7])]  # prefill
    steps += [logits(model, tokens[:, p : p + 1], p) for p in range(7, 15)]  # one token at a time
    steps.append(logits(model, tokens[:, 15:20], 15))  # several tokens at start_pos > 0
    incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-5)


def test_mask_when_several_tokens_arrive_after_start():
    """Meta's v1 built a (T, T) mask for T new tokens at start_pos > 0; the queries must see the cache too."""
    model, _ = random_model()
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    full = logits(model, tokens)
    logits(model, tokens[:, :4])
    chunk = logits(model, tokens[:, 4:12], 4)
    torch.testing.assert_close(chunk, full[:, 4:12], atol=1e-5, rtol=1e-5)
    # The chunk really depends on the cached prefix: another prefix changes it.
    other = tokens.clone()
    other[:, :4] = (other[:, :4] + 1) % 256
    logits(model, other[:, :4])
    assert not torch.allclose(logits(model, tokens[:, 4:12], 4), chunk, atol=1e-3)


def test_grouped_query_attention_equals_repeated_kv_heads():
    """A GQA model equals the multi-head model whose k/v heads are copied to every query head of their group."""
    gqa, sd = random_model(n_heads=4, n_kv_heads=2)
    mha, _ = random_model(n_heads=4, n_kv_heads=4)
    head_dim = 64 // 4
    expanded = dict(sd)
    for name, t in sd.items():
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            # kv head g serves query heads 2g and 2g+1
            expanded[name] = t.view(2, head_dim, 64).repeat_interleave(2, dim=0).reshape(4 * head_dim, 64)
    mha.load_state_dict(expanded)
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(logits(gqa, tokens), logits(mha, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_logits_match_transformers(n_kv_heads):
    transformers = pytest.importorskip("transformers")
    model, sd = random_model(n_heads=4, n_kv_heads=n_kv_heads, rope_theta=500000.0)
    args = model.params
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    ref = transformers.LlamaForCausalLM(config).eval()
    missing, unexpected = ref.load_state_dict(meta_to_hf(sd, args), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref(tokens).logits
    ours = logits(model, tokens)
    diff = (ours - expected).abs().max().item()
    print(f"max |logit difference| vs transformers (n_kv_heads={n_kv_heads}): {diff:.2e}")
    assert diff < 1e-4
    # And with the KV cache, token by token.
    steps = torch.cat([logits(model, tokens[:, :8])] + [logits(model, tokens[:, p : p + 1], p) for p in range(8, 24)], dim=1)
    assert (steps - expected).abs().max().item() < 1e-4
