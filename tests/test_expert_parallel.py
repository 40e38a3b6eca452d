"""Expert-parallel dispatch/combine on 2 and 4 gloo ranks against the single-process DeepSeekMoE."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from plugins.model.config import ModelConfig
from plugins.model.init import init_weights
from plugins.model.moe import DeepSeekMoE, set_ffn_memory
from plugins.parallel.expert import ExpertExchange, apply_expert_parallel, distinct_destinations
from plugins.precision.policy import convert_to_fp8, dispatch_in_fp8

from .conftest import ROOT
from .distributed import STEP_RTOL, spawn
from .launcher import launch

pytestmark = pytest.mark.slow


def _layer(skew: str, mode: str = "plain") -> DeepSeekMoE:
    """``weighted``: the routing weights travel with the rows and are applied before the experts'
    down-projection, whose SwiGLU output is recomputed (``train.memory``); ``fp8``: the same with
    the experts' GEMMs in (emulated) FP8 and, under expert parallelism, the tokens dispatched as
    E4M3 tiles."""
    torch.manual_seed(0)
    config = ModelConfig.from_yaml(ROOT / "configs" / "tiny.yaml")
    moe = DeepSeekMoE(config)
    init_weights(moe, 0.1)
    if mode == "fp8":
        convert_to_fp8(moe, "emulated", ["experts"])
    set_ffn_memory(moe, mode != "plain", mode != "plain")
    if skew == "one_rank":  # every token's experts on the first ranks: the others receive nothing
        moe.gate.e_score_correction_bias[:4] = 10.0
    return moe


def _tokens(rank: int, count: int) -> torch.Tensor:
    return torch.randn(1, count, 128, generator=torch.Generator().manual_seed(100 + rank))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _worker(rank: int, world: int, skew: str, counts: list[int], mode: str, results) -> None:
    # reference: every rank's tokens through the whole layer in one process
    reference = _layer(skew, mode)
    ref_out = [reference(_tokens(r, counts[r])) for r in range(world)]
    sum(o.square().sum() for o in ref_out).backward()

    moe = _layer(skew, mode)
    exchange = ExpertExchange(None, moe.num_experts)
    apply_expert_parallel(moe, exchange)
    if mode == "fp8":
        dispatch_in_fp8(moe)
    out = moe(_tokens(rank, counts[rank]))
    out.square().sum().backward()
    load = moe.tokens_per_expert.clone()
    dist.all_reduce(load)
    local = exchange.local_slice
    routing = moe.gate(_tokens(rank, counts[rank]).reshape(-1, 128))
    results[rank] = {
        "out": _relative(out, ref_out[rank]),
        # expert weights see every rank's tokens: their gradient is the sum over ranks' losses
        "experts": max(_relative(moe.experts.gate_up_proj.grad, reference.experts.gate_up_proj.grad[local]),
                       _relative(moe.experts.down_proj.grad, reference.experts.down_proj.grad[local])),
        "local_shape": tuple(moe.experts.gate_up_proj.shape),
        "gate_grad_own": moe.gate.weight.grad.clone(),
        "load": load.tolist(),
        "destinations": distinct_destinations(routing.indices, torch.arange(world).repeat_interleave(16 // world)).tolist(),
    }
    if rank == 0:
        results["reference_load"] = reference.tokens_per_expert.tolist()
        results["reference_gate_grad"] = reference.gate.weight.grad.clone()


@pytest.mark.parametrize("world,skew,counts,mode", [
    (2, "none", [40, 24], "plain"), (4, "none", [16, 3, 33, 8], "plain"), (2, "one_rank", [20, 20], "plain"),
    (4, "one_rank", [5, 9, 1, 30], "plain"), (2, "none", [40, 24], "weighted"), (4, "one_rank", [5, 9, 1, 30], "fp8")])
def test_expert_parallel_layer_equals_the_single_process_layer(world, skew, counts, mode):
    results = mp.Manager().dict()
    spawn(_worker, world, skew, counts, mode, results)
    for rank in range(world):
        r = results[rank]
        assert r["local_shape"][0] == 16 // world
        assert r["out"] <= STEP_RTOL, (rank, r["out"])
        assert r["experts"] <= STEP_RTOL, (rank, r["experts"])
        assert r["load"] == results["reference_load"]  # the all-reduced load is the whole batch's
        assert all(1 <= d <= min(world, 4) for d in r["destinations"])
    # the gate and shared experts are replicated: summed over ranks their gradients are the reference's
    total = sum(results[rank]["gate_grad_own"] for rank in range(world))
    assert _relative(total, results["reference_gate_grad"]) <= STEP_RTOL


def test_expert_parallel_sizes_that_cannot_run_fail_before_any_work(embedded_run, tmp_path):
    result = launch(2, tmp_path / "ep3", "--ep", "3", data=embedded_run[1])
    assert result.returncode != 0 and "parallel.ep: 3: must be a positive divisor of model.n_routed_experts = 16" in result.stderr
    result = launch(2, tmp_path / "ep4", "--ep", "4", data=embedded_run[1])
    assert result.returncode != 0 and "--ep 4: does not divide the data-parallel size 2" in result.stderr
    assert not (tmp_path / "ep3").exists() and not (tmp_path / "ep4").exists()
