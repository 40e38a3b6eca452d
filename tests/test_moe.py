import itertools

import pytest
import torch

from plugins.model.balance import expert_load, max_violation, sequence_balance_loss, update_router_bias
from plugins.model.config import ModelConfig
from plugins.model.dispatch import permutation, permute, unpermute
from plugins.model.experts import RoutedExperts
from plugins.model.gemm import grouped_mm, padded_grouped_mm
from plugins.model.moe import DeepSeekMoE
from plugins.model.router import Router, select_experts


def _router(n_experts=8, n_group=4, topk_group=2, k=2, dim=8, scale=2.5) -> Router:
    config = ModelConfig(
        hidden_size=dim, n_routed_experts=n_experts, n_group=n_group, topk_group=topk_group,
        num_experts_per_tok=k, routed_scaling_factor=scale, num_hidden_layers=2, first_k_dense_replace=1,
    )
    return Router(config)


def _router_with_scores(scores: torch.Tensor, **kwargs) -> tuple[Router, torch.Tensor]:
    """A router whose affinities for one token equal ``scores`` (gate weight = logit(s) e_0)."""
    router = _router(n_experts=scores.numel(), **kwargs)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = torch.logit(scores)
    x = torch.zeros(1, router.weight.shape[1])
    x[0, 0] = 1.0
    return router, x


def test_routing_chooses_by_biased_scores_but_weights_by_unbiased():
    scores = torch.tensor([0.9, 0.8, 0.2, 0.1, 0.3, 0.25, 0.15, 0.05])
    router, x = _router_with_scores(scores, n_group=1, topk_group=1, k=2)
    router.e_score_correction_bias[2] = 1.0  # expert 2 is underloaded: pushed into the top-k
    routing = router(x)
    assert sorted(routing.indices[0].tolist()) == [0, 2]
    expected = torch.tensor([0.9, 0.2]) / 1.1 * 2.5
    got = routing.weights[0][routing.indices[0].argsort()]
    torch.testing.assert_close(got, expected)


def test_group_limiting_excludes_experts_outside_the_kept_groups():
    # Groups of 2: g0={0.95, 0.0} scores 0.95; g1={0.6,0.6} 1.2; g2={0.5,0.5} 1.0; g3={0.1,0.1} 0.2.
    scores = torch.tensor([0.95, 1e-4, 0.6, 0.6, 0.5, 0.5, 0.1, 0.1])
    router, x = _router_with_scores(scores, n_group=4, topk_group=2, k=2)
    chosen = set(router(x).indices[0].tolist())
    assert 0 not in chosen  # the single best expert's group is not among the two best groups
    assert chosen == {2, 3}
    # Without the group limit the best expert would have been chosen.
    router.topk_group = 4
    assert 0 in set(router(x).indices[0].tolist())


def test_select_experts_matches_brute_force():
    torch.manual_seed(0)
    n_group, per_group, topk_group, k = 4, 4, 2, 3
    biased = torch.rand(50, n_group * per_group)
    got = select_experts(biased, n_group, topk_group, k)
    for row, chosen in zip(biased, got):
        groups = row.view(n_group, per_group)
        group_score = groups.topk(2).values.sum(-1)
        kept = max(itertools.combinations(range(n_group), topk_group), key=lambda c: group_score[list(c)].sum())
        allowed = torch.cat([torch.arange(g * per_group, (g + 1) * per_group) for g in kept])
        best = allowed[row[allowed].topk(k).indices]
        assert set(chosen.tolist()) == set(best.tolist())


def _expert_loop(experts: RoutedExperts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):
    out = torch.zeros_like(x)
    half = experts.gate_up_proj.shape[1] // 2
    for t in range(x.shape[0]):
        for slot in range(indices.shape[1]):
            e = indices[t, slot]
            h = experts.gate_up_proj[e] @ x[t]
            out[t] += weights[t, slot] * (experts.down_proj[e] @ (torch.nn.functional.silu(h[:half]) * h[half:]))
    return out


@pytest.mark.parametrize("loads", ["uneven", "some_empty"])
def test_grouped_experts_equal_a_per_token_reference(loads):
    torch.manual_seed(0)
    experts = RoutedExperts(num_experts=6, hidden_size=16, intermediate_size=8)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    x = torch.randn(20, 16)
    if loads == "uneven":
        indices = torch.stack([torch.randint(0, 6, (20,)), torch.randint(0, 2, (20,))], 1)
    else:  # experts 1, 3, 4 receive nothing
        indices = torch.stack([torch.zeros(20, dtype=torch.long), torch.full((20,), 5)], 1)
    weights = torch.rand(20, 2)
    perm = permutation(indices, 6)
    got = unpermute(experts(permute(x, perm), perm.counts), weights, perm, 20)
    torch.testing.assert_close(got, _expert_loop(experts, x, indices, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_dim", [12, 5])  # 5: rows not 16-byte aligned, the padded path runs
def test_grouped_mm_equals_per_expert_matmuls(out_dim):
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1])
    x, w = torch.randn(9, 8), torch.randn(4, 8, out_dim)
    expected = torch.cat([x[:3] @ w[0], x[3:8] @ w[2], x[8:] @ w[3]])
    torch.testing.assert_close(grouped_mm(x, w, counts), expected)
    torch.testing.assert_close(padded_grouped_mm(x, w, counts), expected)


def test_moe_drops_no_token(tiny_config):
    """Every token gets its shared expert plus exactly k routed experts, however skewed the routing."""
    torch.manual_seed(0)
    moe = DeepSeekMoE(tiny_config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    moe.gate.e_score_correction_bias[:4] = 10.0  # everyone wants experts 0..3
    x = torch.randn(2, 32, tiny_config.hidden_size)
    moe(x)
    load = moe.tokens_per_expert
    assert load.sum().item() == 2 * 32 * tiny_config.num_experts_per_tok
    assert load[:4].tolist() == [64] * 4


def test_balance_loss_limits_of_the_report():
    alpha, n_experts, k, seq_len = 1e-4, 8, 2, 16
    # Perfect balance: every expert chosen equally often, uniform affinities -> alpha.
    scores = torch.full((1, seq_len, n_experts), 0.5)
    indices = torch.arange(seq_len * k).remainder(n_experts).view(1, seq_len, k)
    assert sequence_balance_loss(scores, indices, alpha).item() == pytest.approx(alpha)
    # Collapse onto one expert with all the affinity (k = 1) -> alpha * N_r.
    scores = torch.full((1, seq_len, n_experts), 1e-9)
    scores[..., 3] = 1.0
    indices = torch.full((1, seq_len, 1), 3)
    assert sequence_balance_loss(scores, indices, alpha).item() == pytest.approx(alpha * n_experts, rel=1e-6)
    # Collapse onto k experts sharing all the affinity -> alpha * N_r / k.
    scores = torch.full((1, seq_len, n_experts), 1e-9)
    scores[..., :2] = 1.0
    indices = torch.tensor([0, 1]).expand(1, seq_len, 2)
    assert sequence_balance_loss(scores, indices, alpha).item() == pytest.approx(alpha * n_experts / 2, rel=1e-6)


def test_balance_loss_is_per_sequence():
    """Two sequences each collapsed onto a different expert are imbalanced per sequence even
    though the batch as a whole is balanced."""
    scores = torch.full((2, 4, 2), 1e-9)
    scores[0, :, 0] = scores[1, :, 1] = 1.0
    indices = torch.tensor([0, 1]).view(2, 1, 1).expand(2, 4, 1)
    assert sequence_balance_loss(scores, indices, 1.0).item() == pytest.approx(2.0, rel=1e-6)


def test_bias_update_moves_toward_balance():
    load = expert_load(torch.tensor([[0, 0], [0, 1], [0, 2], [1, 2]]), 4)
    assert load.tolist() == [4, 2, 2, 0]
    bias = torch.zeros(4)
    update_router_bias(bias, load, gamma=0.001)
    assert bias.tolist() == pytest.approx([-0.001, 0.0, 0.0, 0.001])
    assert max_violation(load).item() == pytest.approx(1.0)
    assert max_violation(torch.full((4,), 3.0)).item() == 0.0


def test_load_matrix_has_every_block_and_expert_on_every_rank(tiny_config):
    """A pipeline rank holding no MoE block still contributes a full [blocks, experts] matrix of zeros
    to the step's sum; a rank holding some fills their rows."""
    from plugins.model.balance import collect_expert_loads

    assert collect_expert_loads([], 3, 16).shape == (3, 16)
    moe = DeepSeekMoE(tiny_config, moe_index=2)
    moe(torch.randn(1, 8, tiny_config.hidden_size))
    loads = collect_expert_loads([moe], 3, 16)
    assert loads[:2].abs().sum() == 0 and loads[2].sum() == 8 * tiny_config.num_experts_per_tok
