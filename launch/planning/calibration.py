"""Measuring the machine at hand into a hardware profile (``python -m launch.calibrate``): the
format of ``configs/hardware/*.yaml`` with every figure measured, so the step-time model predicts
this machine's steps.

- the fixed cost of one op (launch, dispatch, Python): the model's own forward and backward at toy
  widths over the ops it runs (``op_count``);
- GEMM rates at the model's own shapes (the MLA and FFN widths of the config) over a range of rows,
  and the routed experts' grouped GEMM (``plugins.model.gemm.grouped_mm``, the model's own) by rows
  per expert for several expert counts per rank; the peak is the best rate seen, the curves the
  fractions of it (the op's fixed cost taken out first);
- SDPA (causal, the model's head sizes) as a fraction of that peak;
- memory-bound kernels (RMSNorm, SwiGLU, FP8 quantization): bytes moved per second; and the
  log-softmax of the cross-entropy at the config's vocabulary (on a CPU its exponentials bound it);
- host<->device copies of pinned memory on a GPU;
- collectives between ``ranks`` local processes (gloo on a CPU, NCCL on GPUs): all-to-all,
  send/receive, all-reduce and reduce-scatter at a small and a large size, giving a latency and a
  bandwidth each; the all-to-all's are the profile's links (one machine: intra- and inter-node alike).

On a CPU the rates are per CPU-second of one thread (process time), and the ranks share the cores
with whatever else runs: ``background_load`` is the runnable threads of other work, from the share of
a core a busy process gets (the scheduler's fair share: cores / (others + 1)).
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from plugins.model.config import ModelConfig
from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.model.gemm import grouped_mm
from plugins.model.norm import RMSNorm
from plugins.precision.fp8 import quantize

from .op_count import count_ops, toy_config

ROWS = (16, 64, 256, 1024, 4096)
EXPERTS_PER_RANK = (1, 2, 4, 8)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device) -> Callable[[], float]:
    """Wall time on a GPU; CPU time of this process on a CPU (other work's share is measured apart)."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def seconds(fn: Callable[[], object], device: torch.device, budget: float = 0.3, repeats: int = 5) -> float:
    """Median seconds of one call of ``fn`` (after one warm-up), repeated until ``budget`` is spent
    (``budget`` 0: exactly ``repeats`` times, as collectives need: every rank makes the same calls)."""
    fn()
    _sync(device)
    times: list[float] = []
    spent = 0.0
    clock = _clock(device)
    while len(times) < repeats or (budget and spent < budget):
        start = clock()
        fn()
        _sync(device)
        times.append(clock() - start)
        spent += times[-1]
        if budget and len(times) >= 200:
            break
    return statistics.median(times)


def op_seconds(config: ModelConfig, device: torch.device) -> float:
    """Seconds of one op of this project's model, its fixed cost: the model at the config's structure
    and toy widths (``op_count``), whose forward and backward do next to no arithmetic, over the ops
    it runs."""
    toy = toy_config(config)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        model = DeepSeekV3(toy).to(device)
        ids = torch.randint(0, toy.vocab_size, (1, 16), device=device)
    ops = count_ops(config)
    total = sum(n.forward + n.backward for n in (ops.dense, ops.moe, ops.head))
    return seconds(lambda: model(ids, labels=ids).loss.backward(), device) / total


def gemm_curve(config: ModelConfig, device: torch.device, dtype: torch.dtype, fixed: float,
               progress: Callable[[str], None]) -> list[list[float]]:
    """[[rows, rate]] over the model's linear shapes (K x N), the median over the shapes at each rows."""
    c = config
    shapes = {(c.hidden_size, 2 * c.moe_intermediate_size), (c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim),
              (c.num_attention_heads * c.v_head_dim, c.hidden_size), (c.intermediate_size, c.hidden_size)}
    rates = []
    for rows in ROWS:
        per_shape = []
        for k, n in sorted(shapes):
            a = torch.randn(rows, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)
            t = seconds(lambda a=a, b=b: a @ b, device, budget=0.1)
            per_shape.append(2 * rows * k * n / max(t - fixed, t * 0.05))
        rates.append([rows, statistics.median(per_shape)])
        progress(f"gemm rows {rows}: {rates[-1][1] / 1e9:.3g} GFLOP/s")
    return rates


def grouped_curve(config: ModelConfig, device: torch.device, dtype: torch.dtype, fixed: float,
                  progress: Callable[[str], None]) -> list[list[float]]:
    """[[rows per expert, rate]]: the model's grouped GEMM (gate and up: hidden -> 2 x expert width),
    median over ``EXPERTS_PER_RANK`` experts per rank."""
    c = config
    k, n = c.hidden_size, 2 * c.moe_intermediate_size
    rates = []
    for rows in ROWS[:-1]:
        per_count = []
        for experts in (e for e in EXPERTS_PER_RANK if e <= c.n_routed_experts):
            x = torch.randn(rows * experts, k, device=device, dtype=dtype)
            w = torch.randn(experts, k, n, device=device, dtype=dtype)
            counts = torch.full((experts,), rows, device=device, dtype=torch.int64)
            t = seconds(lambda x=x, w=w, counts=counts: grouped_mm(x, w, counts), device, budget=0.1)
            per_count.append(2 * rows * experts * k * n / max(t - fixed, t * 0.05))
        rates.append([rows, statistics.median(per_count)])
        progress(f"grouped gemm rows per expert {rows}: {rates[-1][1] / 1e9:.3g} GFLOP/s")
    return rates


def sdpa_rate(config: ModelConfig, seq_len: int, device: torch.device, dtype: torch.dtype, fixed: float) -> float:
    """FLOP/s of causal SDPA at the model's heads (v padded to the q/k head size, as the model runs it)."""
    c = config
    q = torch.randn(1, c.num_attention_heads, seq_len, c.qk_head_dim, device=device, dtype=dtype)
    t = seconds(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), device)
    return seq_len * c.num_attention_heads * 2 * c.qk_head_dim * seq_len / max(t - fixed, t * 0.05)


def memory_rate(config: ModelConfig, device: torch.device, dtype: torch.dtype, fixed: float,
                progress: Callable[[str], None]) -> float:
    """Bytes/s of the memory-bound kernels (median of RMSNorm, SwiGLU, FP8 quantization) at 4096 rows."""
    rows, h, f = 4096, config.hidden_size, config.moe_intermediate_size
    x = torch.randn(rows, h, device=device, dtype=dtype)
    g = torch.randn(rows, 2 * f, device=device, dtype=dtype)
    norm = RMSNorm(h).to(device=device, dtype=dtype)
    size = x.element_size()
    cases = {"rmsnorm": (lambda: norm(x), 2 * rows * h * size),
             "swiglu": (lambda: F.silu(g[:, :f]) * g[:, f:], 3 * rows * f * size),
             "fp8 quantize": (lambda: quantize(x, 1), rows * h * (size + 1))}
    rates = []
    with torch.no_grad():
        for name, (fn, moved) in cases.items():
            t = seconds(fn, device, budget=0.1)
            rates.append(moved / max(t - fixed, t * 0.05))
            progress(f"{name}: {rates[-1] / 1e9:.3g} GB/s")
    return statistics.median(rates)


def cross_entropy_rate(config: ModelConfig, rows: int, device: torch.device, fixed: float) -> float:
    """Bytes/s of float32 logits [rows, vocab] through log-softmax, forward and backward (two passes)."""
    logits = torch.randn(rows, config.vocab_size, device=device, requires_grad=True)
    grad = torch.randn_like(logits)
    t = seconds(lambda: torch.log_softmax(logits, -1).backward(grad), device, budget=0.1)
    return 2 * logits.numel() * 4 / max(t - 2 * fixed, t * 0.05)


def host_rate(device: torch.device) -> float:
    """Bytes/s of a pinned host -> device copy (and back), 256 MB, the mean of the two directions."""
    host = torch.empty(2**28, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device=device)
    up = seconds(lambda: dev.copy_(host, non_blocking=True), device)
    down = seconds(lambda: host.copy_(dev, non_blocking=True), device)
    return 2 * host.numel() / (up + down)


def _wall_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls (after one): a collective waits for its peers."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def background_load(cores: int, seconds_: float = 1.0) -> float:
    """Other runnable threads on the cores, from the share of one core a busy loop gets in ``seconds_``."""
    wall, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds_:
        sum(range(1000))
    share = (time.process_time() - cpu) / (time.perf_counter() - wall)
    return max(0.0, cores / max(share, 1e-3) - 1.0) if share < 0.98 else 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collective_worker(rank: int, ranks: int, port: int, backend: str, results) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=ranks)
    out = {}
    pair = {0: dist.send, 1: dist.recv}.get(rank)  # send/receive between ranks 0 and 1; the others wait
    for size in (2**10, 2**24):  # bytes each rank sends in all: latency, bandwidth
        x = torch.zeros(size // 4, device=device)
        y = torch.empty_like(x)
        cases = {"all_to_all": lambda x=x, y=y: dist.all_to_all_single(y, x),
                 "all_reduce": lambda x=x: dist.all_reduce(x),
                 "reduce_scatter": lambda x=x, y=y: dist.reduce_scatter_tensor(y[: x.numel() // ranks], x),
                 "send_recv": lambda x=x: pair(x, 1 - rank) if pair else None}
        for name, fn in cases.items():
            dist.barrier()
            out[(name, size)] = _wall_seconds(fn, device, repeats=10)
    gathered = [None] * ranks
    dist.all_gather_object(gathered, out)
    if rank == 0:
        results.put({key: max(o[key] for o in gathered) for key in out})
    dist.destroy_process_group()


def collectives(ranks: int, device: torch.device) -> dict[str, dict[str, float]]:
    """{name: {latency, bandwidth}} between ``ranks`` local processes: latency the small message's
    seconds, bandwidth the bytes a rank sends over the large one's extra seconds."""
    import torch.multiprocessing as mp

    backend = "nccl" if device.type == "cuda" else "gloo"
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_collective_worker, args=(ranks, _free_port(), backend, results), nprocs=ranks,
                       start_method="spawn")
    times = results.get()
    small, large = 2**10, 2**24
    out = {}
    for name in ("all_to_all", "send_recv", "all_reduce", "reduce_scatter"):
        t_small, t_large = times[(name, small)], times[(name, large)]
        sent = (large - small) * ((ranks - 1) / ranks if name == "all_to_all" else 1.0)  # off-rank bytes
        out[name] = {"latency": t_small, "bandwidth": sent / max(t_large - t_small, 1e-9)}
    return out


def calibrate(config: ModelConfig, seq_len: int, ranks: int, device: torch.device,
              progress: Callable[[str], None]) -> tuple[dict, dict]:
    """(the profile as a YAML-ready mapping, what was measured beside it)."""
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    name = "bf16" if gpu else "fp32"
    load_at_start = background_load(os.cpu_count() or 1) if not gpu else 0.0
    fixed = op_seconds(config, device)
    progress(f"op fixed cost: {fixed * 1e6:.1f} us")
    dense = gemm_curve(config, device, dtype, fixed, progress)
    grouped = grouped_curve(config, device, dtype, fixed, progress)
    peak = max(rate for _, rate in dense + grouped)
    sdpa = sdpa_rate(config, seq_len, device, dtype, fixed)
    progress(f"sdpa: {sdpa / 1e9:.3g} GFLOP/s")
    memory = memory_rate(config, device, dtype, fixed, progress)
    softmax = cross_entropy_rate(config, min(seq_len, 1024), device, fixed)
    progress(f"log-softmax: {softmax / 1e9:.3g} GB/s of float32 logits")
    comm = collectives(ranks, device)
    a2a = comm["all_to_all"]
    progress("collectives: " + ", ".join(f"{k} {v['bandwidth'] / 1e9:.3g} GB/s, {v['latency'] * 1e6:.0f} us"
                                         for k, v in comm.items()))
    link = {"bandwidth": a2a["bandwidth"], "efficiency": 1.0}
    threads = torch.get_num_threads()
    profile = {
        "name": torch.cuda.get_device_name(device) if gpu else f"cpu ({os.cpu_count()} cores, {threads} threads a rank)",
        # a CPU machine holds every rank it runs: one "node"
        "gpus_per_node": torch.cuda.device_count() if gpu else 1024,
        "flops": {name: peak},
        "gemm_curve": [[rows, round(rate / peak, 4)] for rows, rate in dense],
        "grouped_gemm_curve": [[rows, round(rate / peak, 4)] for rows, rate in grouped],
        "sdpa_efficiency": min(1.0, sdpa / peak),
        "memory": {"bandwidth": memory, "efficiency": 1.0},
        "cross_entropy": {"bandwidth": softmax, "efficiency": 1.0},
        "intra_node": link, "inter_node": dict(link),
        "op_seconds": fixed,
        "collective_latency": a2a["latency"],
    }
    if gpu:
        profile["sms"] = torch.cuda.get_device_properties(device).multi_processor_count
        profile["host"] = {"bandwidth": host_rate(device), "efficiency": 1.0}
        progress(f"host copies: {profile['host']['bandwidth'] / 1e9:.3g} GB/s")
    else:
        profile["cores"] = os.cpu_count() or 1
        # the mean of a sample at the start and one at the end: the load of other work drifts
        profile["background_load"] = round((load_at_start + background_load(profile["cores"])) / 2, 2)
        progress(f"background load: {profile['background_load']} runnable threads on {profile['cores']} cores")
        if threads != 1:
            progress(f"note: {threads} torch threads a rank; the model takes one a rank (run with OMP_NUM_THREADS=1)")
    return profile, {"collectives": comm, "sdpa_flops": sdpa}
