import torch

from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.model.mla import LatentCache


def test_absorbed_latent_cache_decoding_equals_the_training_forward(tiny_config):
    """Prefill + token-by-token decoding through the weight-absorbed path (only c_kv and k_pe
    cached) gives the logits of the expanded SDPA path over the whole sequence."""
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 24))
    cache = LatentCache(tiny_config.num_hidden_layers)
    with torch.no_grad():
        full = model(ids).logits
        pieces = [model(ids[:, :10], cache=cache).logits]
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.seq_len == 24
    assert cache.latents[0].shape == (2, 24, tiny_config.kv_lora_rank)
    assert cache.rope_keys[0].shape == (2, 24, tiny_config.qk_rope_head_dim)


def test_attention_is_causal(tiny_config):
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (1, 16))
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % tiny_config.vocab_size
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[0, :10], b[0, :10], rtol=0, atol=1e-5)
    assert (a[0, 10] - b[0, 10]).abs().max() > 1e-3
