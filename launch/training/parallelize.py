"""Build the rank's part of the model under the run's layout (TorchTitan's ``parallelize``): expert
parallelism (report 3.2.2), this rank's pipeline stages (3.2.1), FP8 linears (3.3), activation
recomputation (3.2.3), what the routed experts keep for backward (3.3.3) and, with ``train.compile``,
each decoder block through ``torch.compile``. The model's math is untouched; what changes is which parameters a rank
holds, how tokens reach the experts, what backward recomputes and, under ``model.balance:
batch_aux``, over which ranks the balance loss counts its tokens (4.5.3). Nothing outside the
rank's part is ever allocated."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from launch.checkpointing.model_source import read_weights
from launch.config.run_config import RunConfig
from launch.distributed import ds_internals
from launch.distributed.groups import ParallelGroups
from plugins.errors import ConfigError
from plugins.model.block import DecoderLayer
from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.model.init import materialize
from plugins.model.moe import set_ffn_memory
from plugins.model.recompute import set_recompute
from plugins.parallel.balance_counts import install_count_reduction
from plugins.parallel.dualpipe import Layout
from plugins.parallel.expert import ExpertExchange, apply_expert_parallel
from plugins.parallel.pipeline_stages import PipelineShard
from plugins.parallel.replicas import stages_of
from plugins.precision.policy import convert_to_fp8, dispatch_in_fp8, fp8_targets, keep_fp8_activations
from plugins.precision.recipe import WEIGHT_DTYPES, resolve_precision


@dataclass
class Parallelized:
    """The rank's trainable module, and the pieces of the layout the trainer needs."""

    module: DeepSeekV3
    exchange: ExpertExchange | None
    shard: PipelineShard | None
    fp8_modules: list[str]
    expert_offset: int  # the global index of the rank's first routed expert


def check_fp8_policy(run: RunConfig) -> None:
    """An FP8 run whose ``parallel.fp8_modules`` match nothing is a config error, found on the meta device."""
    if run.parallel.fp8 == "none":
        return
    with torch.device("meta"):
        probe = DeepSeekV3(run.model)
    if not fp8_targets(probe, run.parallel.fp8_modules):
        raise ConfigError(f"{run.source}: parallel.fp8_modules: {run.parallel.fp8_modules} match no linear layer "
                          "of the model")


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> int:
    """``train.compile``: every decoder block (MLA, then the dense FFN or DeepSeekMoE with its
    dispatcher; the MTP modules' blocks too) compiled in place (``nn.Module.compile``: names,
    parameters and checkpoints unchanged). A dense or single-process MoE block is one graph; an
    expert-parallel MoE block breaks at its all-to-alls (``plugins.parallel.expert.COMPILE_BREAKS``).
    Returns the number of blocks."""
    blocks = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def parallelize(run: RunConfig, groups: ParallelGroups, device: torch.device, init_from: str | None = None
                ) -> Parallelized:
    """Build only this rank's part of the model: on the ``meta`` device, keep the rank's experts and
    pipeline stages, then allocate them on ``device`` and initialise them as the whole model would
    be (``plugins.model.init``), or read them from ``init_from``; then FP8."""
    p = run.parallel
    with torch.device("meta"):
        model = DeepSeekV3(run.model)
    exchange = None
    if groups.ep > 1:
        exchange = ExpertExchange(groups.ep_group, run.model.n_routed_experts, groups.ep_backward_group,
                                  groups.ep_nodes)
        apply_expert_parallel(model, exchange)
    shard = None
    if groups.pp > 1:
        layout = Layout.placement(p.pipeline_schedule, groups.pp)
        shard = PipelineShard(model, stages_of(layout, groups.pipeline_rank), layout.stages)
    if groups.dp > 1:
        install_count_reduction(model, groups.dp_group)
    expert_offset = exchange.local_slice.start if exchange else 0
    # BF16 under bf16 (the engine's weights; FP32 masters are ZeRO's)
    dtype = WEIGHT_DTYPES[resolve_precision(run.train.precision, device.type == "cuda")]
    materialize(model, device, run.model.initializer_range, run.train.seed, expert_offset, dtype)
    if init_from:
        read_weights(init_from, model, expert_offset)
    fp8_modules = convert_to_fp8(model, p.fp8, p.fp8_modules, p.fp8_power_of_two_scales)
    set_recompute(model, run.train.recompute)
    memory = run.train.memory
    set_ffn_memory(model, memory.weighted_combine, memory.swiglu_recompute, memory.offload_ffn)
    model.loss_chunk = memory.loss_chunk_tokens
    if p.fp8 != "none" and memory.fp8_activations:
        keep_fp8_activations(model, p.fp8_power_of_two_scales)
    if p.fp8 != "none" and memory.fp8_dispatch:
        dispatch_in_fp8(model, p.fp8_power_of_two_scales)
    if run.train.compile:
        compile_blocks(model)
    if exchange is not None:
        ds_internals.mark_expert_parameters([param for moe in model.moe_layers() for param in moe.experts.parameters()],
                                            groups.expert_group_name)
    return Parallelized(model, exchange, shard, fp8_modules, expert_offset)
