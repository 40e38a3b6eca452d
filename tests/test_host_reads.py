"""No host syncs in the step beyond a named budget: every ``item``, ``tolist``, ``__bool__``,
``__float__``, ``__int__``, ``cpu`` and ``numpy`` of the trainer's second step counted
(``tests/host_reads.py``) on 2 gloo ranks, under expert parallelism (EP 2) and DualPipe (PP 2).
On a GPU each is a stall of the host until the device has caught up."""

import json
import os
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from .distributed import free_port
from .host_reads import HostReads

pytestmark = pytest.mark.slow

# Each read a step may make, where, and why it cannot go.
PER_STEP = {
    "tolist launch/training/trainer.py": (1, "the step's losses, expert loads, MaxVio and destination statistics, "
                                             "in one read after their one all-reduce (the NaN check and the log)"),
    "tolist launch/training/moe_stats.py": (1, "the router biases' min, max and std for the record, in one read"),
    "tolist launch/training/stragglers.py": (1, "the end-of-step table (busy seconds, preemption signal) in one read"),
    "item launch/training/memory.py": (1, "the largest rank's peak memory for the record"),
    "__bool__ deepspeed/runtime/utils.py": (4, "DeepSpeed's ZeRO step tests the gradient norm for inf/NaN on the host"),
    "__float__ launch/training/trainer.py": (1, "the gradient norm DeepSpeed computed, for the record and the spike guard"),
}
PER_MOE_FORWARD = ("tolist plugins/parallel/expert.py", "all_to_all_single takes its split sizes as Python ints: "
                                                        "one read of the exchanged counts per MoE block forward")
BASE = ["train.wandb_mode=disabled", "model.num_hidden_layers=4", "train.micro_batch_size=1", "train.eval_interval=0",
        "data.validation={}"]


def _rank(rank, world, port, overrides, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    import deepspeed
    import torch
    import torch.distributed as dist

    from launch.config.run_config import load_run_config
    from launch.distributed import ds_internals
    from launch.training.trainer import RunOptions, Trainer

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    ds_internals.release_shared_memory_names()
    trainer = Trainer(load_run_config("configs/tiny.yaml", overrides), RunOptions(run_dir=Path(out) / "run"),
                      torch.device("cpu"))
    try:
        trainer.train_step()  # the first step builds what is built once
        forwards = []
        for moe in trainer.moe_layers:
            moe.register_forward_hook(lambda *_: forwards.append(1))
        with HostReads() as reads:
            trainer.train_step()
        Path(out, f"rank{rank}.json").write_text(json.dumps({"sites": reads.sites, "table": reads.table(),
                                                             "moe_forwards": len(forwards)}))
    finally:
        trainer.close()
        dist.destroy_process_group()


def _allowed(site: str, moe_forwards: int) -> int:
    key = " ".join(site.split()[:1] + [site.split()[1].rsplit(":", 1)[0]])
    if key == PER_MOE_FORWARD[0]:
        return moe_forwards
    return PER_STEP.get(key, (0, ""))[0]


def test_a_training_step_reads_the_host_only_where_named(embedded_run, tmp_path):
    """Budget per rank and step: one split-size read per MoE block forward under EP (none without),
    plus the 9 of ``PER_STEP`` (4 of them DeepSpeed's); measured 16 + 9 under EP 2 (4 micro-batches
    x 4 MoE blocks) and 8 under PP 2. Any other call site fails, named with its count."""
    data = embedded_run[1]
    paths = [f"data.dataset={data['dataset']}", f"data.tokenizer={data['tokenizer']}", "data.builtin_corpus=false"]
    for layout in (["parallel.ep=2"], ["parallel.pp=2"]):
        out = tmp_path / layout[0]
        out.mkdir()
        mp.spawn(_rank, args=(2, free_port(), BASE + paths + layout, str(out)), nprocs=2, join=True)
        for rank in range(2):
            result = json.loads((out / f"rank{rank}.json").read_text())
            sites, forwards = result["sites"], result["moe_forwards"] if layout == ["parallel.ep=2"] else 0
            over = {site: (count, _allowed(site, forwards)) for site, count in sites.items()
                    if count > _allowed(site, forwards)}
            budget = forwards + sum(allowed for allowed, _ in PER_STEP.values())
            assert not over and sum(sites.values()) <= budget, (
                f"{layout} rank {rank}: {sum(sites.values())} host reads (budget {budget}); over their allowance "
                f"(count, allowed): {over}\n{result['table']}")
            if forwards:
                assert sites.get(next(s for s in sites if s.startswith(PER_MOE_FORWARD[0])), 0) == forwards
