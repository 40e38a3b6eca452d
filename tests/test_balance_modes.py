"""``model.balance`` (report 2.1.2 eq. 17-20, 4.5.2, 4.5.3): each mode's loss at the report's
limits, the batch-wise loss equal on 1 rank and on 2 data-parallel ranks, the bias moving only
under ``aux_free`` through real trainer steps, and a bad value as one line."""

import json

import pytest
import torch
import torch.multiprocessing as mp

from plugins.errors import ConfigError
from plugins.model.balance import balance_loss
from plugins.model.config import ModelConfig
from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.model.init import init_weights
from plugins.model.moe import DeepSeekMoE
from plugins.parallel.balance_counts import install_count_reduction
from plugins.parallel.expert import ExpertExchange, apply_expert_parallel

from .conftest import ROOT
from .corpus import code_documents, write_jsonl
from .distributed import spawn

ALPHA, EXPERTS, K, SEQ = 0.01, 8, 2, 16


def _balanced() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences, each routing every expert equally often, with uniform affinities."""
    scores = torch.full((2, SEQ, EXPERTS), 0.5)
    indices = torch.arange(SEQ * K).remainder(EXPERTS).view(1, SEQ, K).expand(2, SEQ, K)
    return scores, indices


def _collapsed(experts=(0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token of two sequences on the same K experts, which hold all the affinity."""
    scores = torch.full((2, SEQ, EXPERTS), 1e-9)
    scores[..., list(experts)] = 1.0
    return scores, torch.tensor(experts).expand(2, SEQ, K)


@pytest.mark.parametrize("mode", ["aux_free", "seq_aux", "batch_aux"])
def test_losses_at_perfect_balance_and_at_total_collapse(mode):
    """Hand values (eq. 17-20): perfect balance f_i = 1, P_i = 1/N_r -> alpha; collapse onto K_r
    experts f_i = N_r/K_r, P_i = 1/K_r for those K_r -> alpha N_r / K_r."""
    assert balance_loss(mode, *_balanced(), ALPHA).item() == pytest.approx(ALPHA)
    assert balance_loss(mode, *_collapsed(), ALPHA).item() == pytest.approx(ALPHA * EXPERTS / K, rel=1e-6)


def test_batch_loss_sees_the_batch_and_sequence_loss_each_sequence():
    """Sequence 0 collapsed onto experts {0, 1}, sequence 1 onto {2, 3}: each sequence is collapsed
    (alpha N_r / K_r), the batch is spread over 4 experts (f_i = N_r / 4, P_i = 1/4: alpha N_r / 4)."""
    scores = torch.full((2, SEQ, EXPERTS), 1e-9)
    scores[0, :, :2] = scores[1, :, 2:4] = 1.0
    indices = torch.stack([torch.tensor([0, 1]).expand(SEQ, K), torch.tensor([2, 3]).expand(SEQ, K)])
    for mode in ("aux_free", "seq_aux"):
        assert balance_loss(mode, scores, indices, ALPHA).item() == pytest.approx(ALPHA * EXPERTS / K, rel=1e-6)
    assert balance_loss("batch_aux", scores, indices, ALPHA).item() == pytest.approx(ALPHA * EXPERTS / 4, rel=1e-6)


def test_none_has_no_loss_whatever_alpha(tiny_config):
    config = ModelConfig.from_dict({**tiny_config.to_dict(), "balance": "none", "aux_loss_alpha": 1.0})
    torch.manual_seed(0)
    model = DeepSeekV3(config)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    out = model(ids, labels=ids)
    assert out.aux_loss.item() == 0.0
    assert out.loss.item() == pytest.approx((out.lm_loss + out.mtp_loss).item())
    assert balance_loss("none", *_collapsed(), 1.0) is None


def test_a_bad_mode_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((ROOT / "configs" / "tiny.yaml").read_text())
    with pytest.raises(ConfigError) as error:
        ModelConfig.from_yaml(path, ["model.balance=seqaux"])
    assert str(error.value) == (f"{path}: model.balance: expected one of aux_free, seq_aux, batch_aux, none, "
                                "got 'seqaux'")


def test_balance_is_training_only_and_leaves_hf_conversion_alone(tiny_config):
    """A seq_aux run's model exports the same HF config.json as the default's and reads back."""
    from plugins.interop.hf import config_from_hf, config_to_hf

    config = ModelConfig.from_dict({**tiny_config.to_dict(), "balance": "seq_aux"})
    exported = config_to_hf(config, torch.float32)
    assert exported == config_to_hf(tiny_config, torch.float32)
    assert config_from_hf(json.loads(json.dumps(exported)), "config.json") == tiny_config


def test_eval_forwards_do_not_reduce_counts(tiny_config):
    moe = DeepSeekMoE(ModelConfig.from_dict({**tiny_config.to_dict(), "balance": "batch_aux"}))
    init_weights(moe, 0.1)

    def fail(counts):
        raise AssertionError("an eval forward reduced its counts")

    moe.reduce_counts = fail
    moe.eval()
    moe(torch.randn(2, 8, tiny_config.hidden_size))
    assert moe.balance_loss is not None


# ------------------------------------------------------------------ batch_aux over data-parallel ranks
def _layer() -> DeepSeekMoE:
    torch.manual_seed(0)
    config = ModelConfig.from_yaml(ROOT / "configs" / "tiny.yaml", ["model.balance=batch_aux",
                                                                    "model.aux_loss_alpha=1.0"])
    moe = DeepSeekMoE(config)
    init_weights(moe, 0.1)
    return moe


def _sequences() -> torch.Tensor:
    return torch.randn(4, 24, 128, generator=torch.Generator().manual_seed(7))


def _loss_and_gate_grad(moe: DeepSeekMoE, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    moe(x)
    loss = moe.balance_loss
    loss.backward()
    return loss.item(), moe.gate.weight.grad.clone()


def _worker(rank: int, world: int, results) -> None:
    import torch.distributed as dist

    mine = _sequences()[2 * rank:2 * rank + 2]
    for layout in ("dp", "dp_ep"):  # expert parallelism inside the data-parallel ranks
        moe = _layer()
        if layout == "dp_ep":
            apply_expert_parallel(moe, ExpertExchange(None, moe.num_experts))
        assert install_count_reduction(moe, None) == 1
        loss, grad = _loss_and_gate_grad(moe, mine)
        values = torch.cat([torch.tensor([loss]), grad.flatten()])
        dist.all_reduce(values)
        values /= world  # DeepSpeed's data-parallel gradient average (and the logged mean)
        results[(layout, rank)] = (values[0].item(), values[1:].view_as(grad))


@pytest.mark.slow
def test_batch_loss_and_gradients_on_two_ranks_equal_one_rank():
    """One rank with the 4 sequences as one micro-batch against 2 gloo ranks with 2 each: the
    same loss (f_i counted over the round's 4 sequences) and the same gate gradient."""
    loss, grad = _loss_and_gate_grad(_layer(), _sequences())
    assert loss > 1.0  # an imbalanced routing: the comparison is not of two constants
    results = mp.Manager().dict()
    spawn(_worker, 2, results)
    for key, (two_loss, two_grad) in results.items():
        assert two_loss == pytest.approx(loss, rel=1e-5), key
        torch.testing.assert_close(two_grad, grad, rtol=1e-5, atol=1e-7)
    # the local count alone (no reduction) would give another loss: the reduction is what is tested
    alone = _layer()
    alone(_sequences()[:2])
    assert alone.balance_loss.item() != pytest.approx(loss, rel=1e-3)


# ------------------------------------------------------------------ the bias through trainer steps
MODES = ("aux_free", "seq_aux", "batch_aux", "none")


def _train(rank: int, world: int, root: str, data: dict, results) -> None:
    import os
    from pathlib import Path

    from launch.config.run_config import load_run_config
    from launch.training.trainer import RunOptions, Trainer

    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")  # what DeepSpeed's launcher would set
    for mode in MODES:
        run = load_run_config(ROOT / "configs" / "tiny.yaml", [
            f"model.balance={mode}", "model.aux_loss_alpha=0.01", f"data.dataset={data['dataset']}",
            f"data.tokenizer={data['tokenizer']}", "data.builtin_corpus=false", "train.wandb_mode=disabled",
            "train.bias_update_speed.value=0.01", "data.validation={}"])
        trainer = Trainer(run, RunOptions(Path(root) / mode, steps=3), torch.device("cpu"))
        records = [trainer.train_step()[0] for _ in range(3)]
        results[mode] = {
            "bias": max(m.gate.e_score_correction_bias.abs().max().item() for m in trainer.moe_layers),
            "gamma": [r["bias_update_speed"] for r in records],
            "aux_loss": [r["aux_loss"] for r in records],
        }


@pytest.fixture(scope="module")
def data(tokenizer_dir, tmp_path_factory):
    from data_pipeline.prepare import main as prepare

    root = tmp_path_factory.mktemp("balance_data")
    corpus = write_jsonl(root / "docs.jsonl", code_documents(limit=5))
    assert prepare(["--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--seq-len", "128",
                    "--output", str(root / "packed")]) == 0
    assert json.loads((root / "packed" / "manifest.json").read_text())["sequences"] >= 24
    return {"dataset": root / "packed", "tokenizer": tokenizer_dir}


@pytest.mark.slow
def test_only_aux_free_moves_the_bias_through_trainer_steps(data, tmp_path):
    """3 real steps per mode (1 rank): gamma is the schedule's under aux_free, 0 (and logged 0)
    otherwise whatever train.bias_update_speed says; the bias moves only under aux_free; the
    auxiliary loss is there except under none."""
    results = mp.Manager().dict()
    spawn(_train, 1, str(tmp_path), data, results)
    assert results["aux_free"]["gamma"] == [0.01] * 3 and results["aux_free"]["bias"] > 0
    assert min(results["aux_free"]["aux_loss"]) > 0
    for mode in ("seq_aux", "batch_aux", "none"):
        assert results[mode]["gamma"] == [0.0] * 3 and results[mode]["bias"] == 0.0, mode
    assert min(results["seq_aux"]["aux_loss"] + results["batch_aux"]["aux_loss"]) > 0
    assert results["none"]["aux_loss"] == [0.0] * 3


@pytest.mark.slow
def test_batch_loss_under_dualpipe_counts_over_each_stage_data_parallel_ranks(data, tmp_path):
    """--pp 2 --ep 2 (DualPipe, 2 data-parallel replicas) against 2 plain data-parallel ranks: the
    same micro-batch rounds, so the same losses; each stage's counts are summed over its own
    data-parallel ranks (a reduction over the wrong ranks would change f_i and the loss)."""
    from .launcher import launch, metrics, ok

    sets = ["--steps", "2", "--set", "model.balance=batch_aux", "--set", "model.aux_loss_alpha=0.01",
            "--set", "train.micro_batch_size=1"]
    ok(launch(2, tmp_path / "dp2", *sets, data=data))
    ok(launch(4, tmp_path / "pp2", "--pp", "2", "--ep", "2", *sets, data=data))
    for a, b in zip(metrics(tmp_path / "dp2"), metrics(tmp_path / "pp2"), strict=True):
        assert b["bias_update_speed"] == 0.0 and b["aux_loss"] > 0
        assert b["aux_loss"] == pytest.approx(a["aux_loss"], rel=1e-6)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
