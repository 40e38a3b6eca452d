"""The 671B recipe's schedules against the report's numbers (4.2 "Training Hyper-Parameters")."""

import pytest

from launch.config.run_config import load_run_config
from launch.config.schedules import BatchGrid, batch_size, learning_rate, step_value

from .conftest import ROOT

T, B = 1e12, 1e9


@pytest.fixture(scope="module")
def recipe():
    return load_run_config(ROOT / "configs" / "deepseek_v3_671b.yaml").train


def test_learning_rate_follows_the_report(recipe):
    lr = recipe.lr
    assert learning_rate(lr, 0, 0) == pytest.approx(2.2e-4 / 2000)
    assert learning_rate(lr, 999, 4e9) == pytest.approx(2.2e-4 / 2)
    assert learning_rate(lr, 1999, 8e9) == pytest.approx(2.2e-4)
    assert learning_rate(lr, 50_000, 5 * T) == 2.2e-4
    assert learning_rate(lr, 10**6, 10 * T - 1) == 2.2e-4
    assert learning_rate(lr, 10**6, 10 * T + 2.15 * T) == pytest.approx((2.2e-4 + 2.2e-5) / 2)  # cosine midpoint
    assert learning_rate(lr, 10**6, 14.3 * T - 1e6) == pytest.approx(2.2e-5, rel=1e-6)
    assert learning_rate(lr, 10**6, 14.3 * T + 300 * B) == 2.2e-5
    assert learning_rate(lr, 10**6, 14.3 * T + 334 * B) == 7.3e-6  # the last 167B tokens
    assert learning_rate(lr, 10**6, 14.8 * T) == 7.3e-6
    assert recipe.total_tokens == 14.8 * T


def test_batch_size_ramps_from_3072_to_15360_over_469b_tokens(recipe):
    assert batch_size(recipe.batch, 0) == 3072
    assert batch_size(recipe.batch, 234.5 * B) == (3072 + 15360) // 2
    assert batch_size(recipe.batch, 469 * B) == 15360
    assert batch_size(recipe.batch, 10 * T) == 15360
    assert batch_size(recipe.batch, 100 * B, BatchGrid(64, 64)) % 64 == 0


def test_gamma_and_lambda_switch_at_the_reports_marks(recipe):
    assert step_value(recipe.bias_update_speed, 14.3 * T - 1) == 0.001
    assert step_value(recipe.bias_update_speed, 14.3 * T) == 0.0  # 0 for the last 500B tokens
    assert step_value(recipe.mtp_weight, 10 * T - 1) == 0.3
    assert step_value(recipe.mtp_weight, 10 * T) == 0.1


def test_optimizer_and_sequence_length(recipe):
    run = load_run_config(ROOT / "configs" / "deepseek_v3_671b.yaml")
    assert recipe.betas == (0.9, 0.95) and recipe.weight_decay == 0.1 and recipe.grad_clip == 1.0
    assert run.data.seq_len == 4096 and run.model.aux_loss_alpha == 1e-4
