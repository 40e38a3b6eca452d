import pytest
import torch

from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.model.mtp import mtp_targets


def test_mtp_targets_shift_by_depth_and_stop_at_document_ends():
    labels = torch.tensor([[11, 12, 13, 14, 15, 16]])  # labels[t] = token t+1
    assert mtp_targets(labels, 1).tolist() == [[12, 13, 14, 15, 16, -100]]
    assert mtp_targets(labels, 2).tolist() == [[13, 14, 15, 16, -100, -100]]
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]])
    # Position 2 is doc 0's last token; its depth-1 input token (position 3) is doc 1's.
    assert mtp_targets(labels, 1, docs).tolist() == [[12, 13, -100, 15, 16, -100]]
    assert mtp_targets(labels, 2, docs).tolist() == [[13, -100, -100, 16, -100, -100]]


def _model(tiny_config, depth=1):
    tiny_config.num_nextn_predict_layers = depth
    torch.manual_seed(0)
    return DeepSeekV3(tiny_config)


def test_mtp_depth_k_at_position_i_sees_tokens_up_to_i_plus_k(tiny_config):
    """Depth 1 predicts t_{i+2} from t_{<=i+1}: changing t_{j} leaves positions < j-1 untouched
    and does change position j-1 (which embeds t_j)."""
    model = _model(tiny_config, depth=2).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (1, 20))
    changed = ids.clone()
    changed[0, 12] = (ids[0, 12] + 1) % tiny_config.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    for k, (la, lb) in enumerate(zip(a.mtp_logits, b.mtp_logits), start=1):
        # Equal up to float reordering: the grouped expert GEMMs see other per-expert counts.
        torch.testing.assert_close(la[0, : 12 - k], lb[0, : 12 - k], rtol=0, atol=1e-5)
        assert (la[0, 12 - k] - lb[0, 12 - k]).abs().max() > 1e-3


def test_mtp_loss_is_lambda_over_depth_times_the_sum(tiny_config):
    model = _model(tiny_config, depth=2)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 16))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    out = model(ids, labels=labels, mtp_weight=0.1)
    assert len(out.mtp_losses) == 2
    assert out.mtp_loss.item() == pytest.approx(0.1 / 2 * sum(loss.item() for loss in out.mtp_losses), rel=1e-6)
    # lambda = 0 (a schedule's switch-off) leaves the MTP modules' own weights untrained
    model(ids, labels=labels, mtp_weight=0.0).loss.backward()
    assert all(m.norm.weight.grad.abs().max() == 0 for m in model.mtp)  # only MTP logits read it
    # Depth-1 loss is the cross-entropy of the depth-1 logits against labels shifted by one.
    manual = torch.nn.functional.cross_entropy(out.mtp_logits[0][:, :-2].reshape(-1, tiny_config.vocab_size),
                                               labels[:, 1:-1].reshape(-1))
    assert out.mtp_losses[0].item() == pytest.approx(manual.item(), rel=1e-5)


def test_document_ids_remove_cross_document_mtp_targets(tiny_config):
    model = _model(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (1, 16))
    labels = torch.roll(ids, -1, 1)
    docs = torch.tensor([[0] * 8 + [1] * 8])
    with torch.no_grad():
        whole = model(ids, labels=labels, document_ids=docs)
        logits = whole.mtp_logits[0][0]
        keep = [i for i in range(15) if i != 7]  # position 7 ends doc 0; position 15 has no target
        manual = torch.nn.functional.cross_entropy(logits[keep], labels[0, 1:][keep])
    assert whole.mtp_losses[0].item() == pytest.approx(manual.item(), rel=1e-5)


def test_gradients_reach_every_parameter_but_not_the_router_bias(tiny_config):
    model = _model(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 24))
    labels = torch.roll(ids, -1, 1)
    out = model(ids, labels=labels)
    out.loss.backward()
    without = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without == []
    bias_names = [n for n, _ in model.named_buffers() if n.endswith("e_score_correction_bias")]
    assert len(bias_names) == len(model.moe_layers()) == 3  # 2 main MoE blocks + the MTP block
    assert not any("e_score_correction_bias" in n for n, _ in model.named_parameters())
    assert [m.tokens_per_expert.sum().item() for m in model.moe_layers()] == [2 * 24 * tiny_config.num_experts_per_tok] * 3
    assert out.aux_loss.requires_grad


def test_decoding_through_the_cache_ignores_the_mtp_blocks_balance_loss(tiny_config):
    """A forward with the latent cache skips MTP: its aux loss is the main blocks' only, whatever an
    earlier training forward left behind."""
    from plugins.model.mla import LatentCache

    model = _model(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (1, 12))
    labels = torch.roll(ids, -1, 1)
    model(ids)  # a forward without labels: its balance losses must not be kept for later
    cached = model(ids, labels=labels, cache=LatentCache(tiny_config.num_hidden_layers))
    assert all(m.balance_loss is None for m in model.moe_layers())
    fresh = _model(tiny_config)
    fresh_cached = fresh(ids, labels=labels, cache=LatentCache(tiny_config.num_hidden_layers))
    assert cached.aux_loss.item() == pytest.approx(fresh_cached.aux_loss.item(), rel=1e-6)
