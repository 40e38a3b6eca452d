"""Every place this project reaches into DeepSpeed beyond its documented API, in one module, so a
DeepSpeed upgrade is checked here (``pyproject.toml`` pins the tested range).

- expert parallelism: DeepSpeed's own expert / expert-data-parallel groups (``ep_size_N``), the
  ``allreduce``/``group_name`` marks on expert parameters and ``moe`` optimizer groups, and an
  engine that turns its MoE gradient path on for marked parameters of a model that is not its
  own MoE layer class (report 3.2.2: EP inside ZeRO-1 data parallelism);
- pipeline parallelism: the ``PipelineParallelGrid`` as ``mpu`` and the ``ds_pipe_replicated``
  mark, so the global gradient norm counts a replicated parameter once;
- precision: ZeRO-1's own FP32 gradient accumulation for BF16 weights (its "stage 1, mode 2":
  each backward's BF16 gradient added into ``param.grad_accum`` in FP32, reduced from there),
  which DeepSpeed's engine otherwise hands to its separate ``BF16_Optimizer`` whose partitions,
  steps and checkpoints this project does not read;
- steps: a step skipped after the gradients were reduced (DeepSpeed's own skipped-step path, as on
  an fp16 overflow) and the gradient reduction marked as waiting on other ranks
  (``plugins.progress``);
- checkpoints: ZeRO-1's per-parameter fragments of its FP32 partition and AdamW moments, its step
  counter, and the copy of loaded FP32 partitions back into the model's weights;
- the CPU all-reduce's leaked ``/dev/shm`` buffers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed import DeepSpeedConfig, DeepSpeedEngine, set_optimizer_flags
from deepspeed.moe.utils import is_moe_param
from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION
from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID
from deepspeed.utils import groups as ds_groups

from plugins.progress import waiting


# ----------------------------------------------------------------------------------- groups
def pipeline_grid(pp: int, dp: int):
    """DeepSpeed's pipeline grid (ranks pipeline-major), registered as its global ``mpu``."""
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, PipelineParallelGrid

    ds_groups.mpu = PipelineParallelGrid(topology=PipeDataParallelTopology(num_pp=pp, num_dp=dp))
    return ds_groups.mpu


def expert_groups(ep: int, mpu=None) -> tuple[dist.ProcessGroup, int, str]:
    """DeepSpeed's expert-parallel groups of ``ep`` consecutive ranks inside each data-parallel
    group; returns (this rank's expert-parallel group, its rank among the ranks holding the same
    experts, the groups' name). Its expert-gradient all-reduce and ZeRO-1 partitions find them by name."""
    name = f"ep_size_{ep}"
    if mpu is not None:
        ds_groups._create_expert_data_and_model_parallel(ep, mpu=mpu)
    else:
        ds_groups._create_expert_and_data_parallel(ep)
    return ds_groups._get_expert_parallel_group(name), ds_groups._get_expert_data_parallel_rank(name), name


# ---------------------------------------------------------------------------- parameter marks
def mark_expert_parameters(params, group_name: str) -> None:
    """Expert parameters: reduced over the expert-data-parallel group only, ZeRO-partitioned there."""
    for param in params:
        param.allreduce = False
        param.group_name = group_name


def mark_pipe_replicated(params) -> None:
    """Copies of a parameter another pipeline rank also holds: left out of the global gradient norm."""
    for param in params:
        param.ds_pipe_replicated = True


def is_pipe_replicated(param) -> bool:
    return getattr(param, "ds_pipe_replicated", False)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; none on norms (the router bias is a buffer, not a parameter).
    Expert-parallel banks form their own ``moe`` group, which DeepSpeed reduces and partitions
    over the ranks holding the same experts."""
    experts = [p for p in model.parameters() if is_moe_param(p)]
    decay = [p for p in model.parameters() if p.ndim >= 2 and not is_moe_param(p)]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if experts:
        groups.append({"params": experts, "weight_decay": weight_decay, "moe": True, "name": experts[0].group_name})
    return groups


# ------------------------------------------------------------------------------------ engine
class Engine(DeepSpeedEngine):
    """DeepSpeed's engine with the MoE gradient path on for marked expert parameters of a model that
    is not its own MoE layer class, and ZeRO-1 kept as the optimizer under BF16 weights with FP32
    gradient accumulation."""

    def _configure_distributed_model(self, model: torch.nn.Module) -> None:
        super()._configure_distributed_model(model)
        self.has_moe_layers = self.has_moe_layers or any(is_moe_param(p) for p in model.parameters())

    def _do_optimizer_sanity_check(self, basic_optimizer):
        wrapper = super()._do_optimizer_sanity_check(basic_optimizer)
        return ZERO_OPTIMIZATION if self.zero_optimization() else wrapper


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict, mpu=None) -> DeepSpeedEngine:
    """``deepspeed.initialize`` for our model (``Engine``); ``mpu``: the pipeline grid under pipelining."""
    from deepspeed import comm
    from deepspeed.accelerator import get_accelerator

    # what deepspeed.initialize does first: DeepSpeed's comm on the process group already made
    comm.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    config_class = DeepSpeedConfig(config, mpu)
    set_optimizer_flags(config_class, model)
    engine = Engine(args=None, model=model, optimizer=optimizer, config=config, config_class=config_class, mpu=mpu)
    if engine.bfloat16_enabled() and not engine.optimizer.use_grad_accum_attribute:
        raise RuntimeError("DeepSpeed's ZeRO-1 did not take FP32 gradient accumulation for BF16 weights; "
                           "launch/distributed/ds_internals.py needs a look at this DeepSpeed version")
    return engine


# ------------------------------------------------------------------------------------ steps
def gated_step(engine, skip: Callable[[float], bool]) -> bool:
    """``engine.step()`` at the accumulation boundary, asking ``skip(global gradient norm)`` once the
    gradients are reduced and before they are applied. A skip takes ZeRO's own skipped-step path (the
    one an fp16 overflow takes): the reduced gradients are dropped, the weights, AdamW's moments and
    its step count stay as they were, the engine counts a skipped step. Returns whether the update
    was applied. The norm is computed once (the step reuses it for clipping)."""
    zero = engine.optimizer
    applied = True

    def step(closure=None) -> None:
        nonlocal applied
        norm = zero.scaled_global_norm()
        if skip(float(norm)):
            applied = False
            zero.micro_step_id = INITIAL_MICRO_STEP_ID
            zero.overflow = True  # what the engine reads: a skipped step, no scheduler step
            zero.zero_grad(set_to_none=True)
            zero._release_preflattened_grad_buffers()
            for key in zero.averaged_gradients:
                zero.averaged_gradients[key] = None
                zero.all_grad_tensors[key] = None
            return
        zero.scaled_global_norm = lambda norm_type=2: norm
        try:
            type(zero).step(zero)
        finally:
            del zero.scaled_global_norm

    zero.step = step
    try:
        engine.step()
    finally:
        del zero.step
    return applied


def gradient_attribute(engine) -> str:
    """Where a parameter's accumulated gradient is between backward and the step: ``grad``, or
    ``grad_accum`` (FP32) where ZeRO-1 accumulates BF16 weights' gradients in FP32."""
    return "grad_accum" if getattr(engine.optimizer, "use_grad_accum_attribute", False) else "grad"


def mark_gradient_reduction(engine) -> None:
    """DeepSpeed's data-parallel gradient reduction counts as waiting on other ranks (a phase for the
    hang watchdog, time off the rank's busy time)."""
    reduce = engine.allreduce_gradients

    def marked(*args, **kwargs):
        with waiting("gradient all-reduce"):
            return reduce(*args, **kwargs)

    engine.allreduce_gradients = marked


# ------------------------------------------------------------------------- optimizer states
def link_optimizer_states(engine) -> None:
    """Make every parameter's view of its AdamW moments valid. DeepSpeed links them once, after the
    first optimizer step of the first ZeRO parameter group, so the other groups' views stay empty;
    before any step (a resumed run) there are no moments at all. Create what is missing (zeros in
    the optimizer's moment dtype, step 0: ``plugins.precision.moments.AdamW.new_state``) and re-link
    all groups."""
    zero = engine.optimizer
    for flat in zero.single_partition_of_fp32_groups:
        state = zero.optimizer.state[flat]
        if not state:
            state.update(zero.optimizer.new_state(flat))
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


def zero_fragments(engine) -> list[tuple[str, torch.nn.Parameter, int, dict[str, torch.Tensor]]]:
    """This rank's ZeRO-1 share of every parameter: (name, parameter, flat start of the share within
    the parameter, {"model": FP32 master values, "exp_avg", "exp_avg_sq"}), the tensors being 1-D
    views into the optimizer's own partition (writing them writes the optimizer state)."""
    link_optimizer_states(engine)
    shares = []
    for name, param in engine.module.named_parameters():
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:
            states = {"model": mapping.hp_fragment,
                      **{key: mapping.get_optim_state_fragment(key) for key in ("exp_avg", "exp_avg_sq")}}
            shares.append((name, param, mapping.lp_fragment_address.start, states))
    return shares


def copy_master_weights_to_model(engine) -> None:
    """After the FP32 partitions were loaded: each rank copies its partition into the model's
    (bf16 or fp32) weights and the data-parallel ranks all-gather the rest, as after a step."""
    engine.optimizer.update_lp_params()


def adam_step(engine) -> float:
    steps = [float(state["step"]) for state in engine.optimizer.optimizer.state.values()]
    return steps[0] if steps else 0.0


def set_adam_step(engine, step: float) -> None:
    for state in engine.optimizer.optimizer.state.values():
        state["step"].fill_(step)


# ------------------------------------------------------------------------------ shared memory
def release_shared_memory_names() -> None:
    """DeepSpeed's CPU all-reduce maps a 69 MB /dev/shm buffer per rank and never unlinks it, so
    every run leaks them until /dev/shm is full. Once every rank has mapped its peers' buffers
    (the barrier), each rank unlinks its own name; the mappings stay valid until exit."""
    dist.barrier()
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_*_{os.environ.get('MASTER_PORT', '*')}_{dist.get_rank()}"
    for path in Path("/dev/shm").glob(pattern):
        path.unlink(missing_ok=True)
