"""Validation during training (issue 17, report 4.5): every ``train.eval_interval`` steps the
model scores the first ``train.eval_sequences`` packed sequences of each ``data.validation``
domain, with the layout it trains in (data-parallel ranks split the sequences, pipeline ranks
pass them along, expert ranks exchange tokens), and reports per domain the mean token loss and
bits per byte, and over the whole validation batch the expert loads:

- ``maxvio_batch``: MaxVio (report 4.5.2) of each MoE block's load over the validation batch,
  averaged over blocks;
- ``specialization`` (Figure 9 in one number): per MoE block the mean over domains of
  KL(p_d || p), p_d a domain's load share over the routed experts and p the pooled share of all
  domains' tokens, in nats, averaged over blocks; 0 when every domain uses the experts alike,
  ln(#domains) at most (disjoint experts, equal token counts).

The packed scoring (``launch.evaluation.scoring``) is also ``launch.evaluate --packed``'s, which
reloads a checkpoint as one whole model: the two agree on the same checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from launch.evaluation.scoring import model_logits, score_logits, summarize
from plugins.errors import ConfigError
from plugins.model.balance import collect_expert_loads, max_violation, reset_expert_loads
from plugins.parallel.dualpipe import Layout
from plugins.parallel.pipeline_forward import pipeline_logits
from plugins.precision.policy import fp8_autocast
from plugins.progress import waiting


def specialization(domain_loads: torch.Tensor) -> torch.Tensor:
    """[blocks]: mean over domains of KL(p_d || p_pooled) of ``domain_loads`` [domains, blocks, experts]."""
    loads = domain_loads.double()
    share = loads / loads.sum(-1, keepdim=True).clamp_min(1e-12)
    pooled = loads.sum(0) / loads.sum((0, 2))[:, None].clamp_min(1e-12)
    terms = torch.where(share > 0, share * (share / pooled.clamp_min(1e-300)).log(), torch.zeros_like(share))
    return terms.sum(-1).mean(0)


class Stopped(Exception):
    """A rank had a preemption to act on (``cause``, ``launch.training.preemption``): every rank
    stopped validating at the same micro-batch."""

    def __init__(self, cause: int):
        super().__init__(cause)
        self.cause = cause


class Validator:
    """Scores the held-out sets with the training layout; ``run`` is collective over all ranks.

    ``shard`` is the rank's ``PipelineShard`` under pipelining (else ``None``; ``model`` is then
    the rank's whole model with its local experts)."""

    def __init__(self, sets: dict, token_bytes: list[int], model, shard, groups, micro_batch: int,
                 schedule: str, fp8_backend: str, source: str, max_sequences: int, device: torch.device):
        self.model, self.shard, self.groups, self.micro = model, shard, groups, micro_batch
        self.fp8_backend, self.device = fp8_backend, device
        self.layout = Layout.placement(schedule, groups.pp) if shard is not None else None
        self.token_bytes = torch.tensor(token_bytes, dtype=torch.float64, device=device)
        per_round = micro_batch * groups.dp
        self.sets = {}
        for name, dataset in sets.items():
            count = min(max_sequences, len(dataset)) // per_round * per_round
            if not count:
                raise ConfigError(f"{source}: data.validation.{name}: {len(dataset)} sequences (train.eval_sequences "
                                  f"{max_sequences}) cannot give each of the {groups.dp} data-parallel ranks one "
                                  f"micro-batch of {micro_batch}")
            self.sets[name] = (dataset, count)
        config = model.config
        self.moe_blocks = config.num_hidden_layers - config.first_k_dense_replace  # MTP blocks do not run here
        self.shape = (config.num_moe_layers, config.n_routed_experts)

    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        with fp8_autocast(self.fp8_backend):
            if self.shard is None:
                return model_logits(self.model, input_ids)
            g = self.groups
            return pipeline_logits(self.shard, self.layout, g.pipeline_rank, g.pipeline_peers, g.channels, input_ids)

    def _stop_agreed(self, pending: Callable[[], int]) -> None:
        """Raise ``Stopped`` on every rank when any rank has a preemption pending. Collective: every
        rank scores the same number of micro-batches, so all ask at the same ones."""
        flag = torch.tensor([float(pending())], dtype=torch.float64, device=self.device)
        with waiting("validation stop all-reduce"):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        cause = int(flag.item())
        if cause:
            raise Stopped(cause)

    def _score(self, dataset, count: int, pending: Callable[[], int]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (nll, tokens, bytes) sums and the loads its blocks counted, over its share."""
        mine = list(range(self.groups.dp_rank, count, self.groups.dp))
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        moe_layers = self.model.moe_layers()
        reset_expert_loads(moe_layers)
        for start in range(0, len(mine), self.micro):
            self._stop_agreed(pending)
            samples = [dataset[i] for i in mine[start:start + self.micro]]
            input_ids = torch.stack([s["input_ids"] for s in samples]).to(self.device)
            labels = torch.stack([s["labels"] for s in samples]).to(self.device)
            logits = self._logits(input_ids)
            if logits is not None:
                totals += score_logits(logits, labels, self.token_bytes)
        loads = collect_expert_loads(moe_layers, *self.shape, self.device)
        reset_expert_loads(moe_layers)
        for moe in moe_layers:
            moe.balance_loss = None
        return totals, loads

    def run(self, step: int, tokens: int, pending: Callable[[], int]) -> dict:
        """The validation record of ``step`` (the same on every rank); raises ``Stopped`` at the
        micro-batch boundary after ``pending()`` (a preemption to act on) is non-zero on any rank."""
        was_training = self.model.training
        self.model.eval()
        try:
            scored = [self._score(dataset, count, pending) for dataset, count in self.sets.values()]
            self._stop_agreed(pending)  # one that came during the last micro-batch
        finally:
            self.model.train(was_training)
        totals = torch.stack([t for t, _ in scored])
        loads = torch.stack([load for _, load in scored]).double()
        reduced = torch.cat([totals.flatten(), loads.flatten()])
        dist.all_reduce(reduced)  # every sequence's loss and every block's count live on exactly one rank
        totals = reduced[:totals.numel()].view_as(totals)
        loads = reduced[totals.numel():].view_as(loads)[:, :self.moe_blocks]
        record = {"step": step, "tokens": tokens,
                  "val": {name: summarize(t) for name, t in zip(self.sets, totals)}}
        maxvio = max_violation(loads.sum(0)).tolist() if self.moe_blocks else []
        special = specialization(loads).tolist() if self.moe_blocks else []
        record.update({
            "maxvio_batch": sum(maxvio) / len(maxvio) if maxvio else 0.0, "maxvio_batch_per_block": maxvio,
            "specialization": sum(special) / len(special) if special else 0.0, "specialization_per_block": special,
            "domain_load": {name: load.round().long().tolist() for name, load in zip(self.sets, loads)},
        })
        return record
