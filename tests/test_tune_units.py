"""Sweep configs and search spaces (checked before any trial), µP proxy/target pairs, the results
table, and the µP coordinate check, without a cluster."""

from __future__ import annotations

import pytest

from odyssey.config import load_config
from odyssey.errors import ConfigError
from odyssey.model import ModelConfig, tiny
from tune import results, space, sweep
from tune.config import SweepConfig, sweep_path
from tune.coord_check import coord_check


def plan(*settings: str, transfer: bool = False) -> sweep.Plan:
    return sweep.plan(load_config(SweepConfig, sweep_path("tiny-lr"), list(settings)), transfer)


def test_shipped_sweeps_plan():
    p = plan()
    assert [q.field for q in p.params] == ["optim.lr", "optim.warmup_steps", "optim.weight_decay"]
    assert p.base["scaling"]["workers"] == 1  # the trial's resources replace the recipe's scaling
    assert p.trial_tokens == 48 * 2048
    assert p.rungs == [6 * 2048, 18 * 2048]  # halving: 1/8 of the steps, then x3
    big = sweep.plan(load_config(SweepConfig, sweep_path("gpt-350m-mup")), transfer=True)
    assert big.base["model"]["d_model"] == 256 and big.target["model"]["d_model"] == 1024
    assert big.base["model"]["mup"] and big.target["model"]["mup_base_width"] == 256


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "space.optim.lrr={loguniform: [1e-3, 1e-2]}",
            r"space\.optim\.lrr: unknown field 'optim\.lrr'; did you mean 'optim\.lr'",
        ),
        (
            "space.optim.lr={loguniform: [1e-2, 1e-3]}",
            r"space\.optim\.lr: the range \[0\.01, 0\.001\] is empty",
        ),
        ("space.optim.lr={uniform: [0.01, 0.01]}", r"space\.optim\.lr: the range .* is empty"),
        ("space.optim.lr={choice: []}", r"space\.optim\.lr: choice needs a non-empty list"),
        ("space.optim.lr={loguniform: [0, 1e-2]}", r"space\.optim\.lr: loguniform needs low > 0"),
        ("space.optim.lr={uniform: [0, 1e-2]}", r"space\.optim\.lr: optim: lr must be positive"),
        ("space.optim.lr={normal: [0, 1]}", r"space\.optim\.lr: unknown distribution 'normal'"),
        ("space.optim.lr=0.01", r"space\.optim\.lr: give one distribution"),
        ("space.optim.warmup_steps={int: [0.5, 3]}", r"space\.optim\.warmup_steps: int needs integer ends"),
        (
            "space.global_batch_tokens={choice: [2048, 1000]}",
            r"space\.global_batch_tokens: global_batch_tokens=1000 is not a multiple",
        ),
        (
            "space.model.n_head={choice: [4, 5]}",
            r"space\.model\.n_head: .*d_model=128 is not divisible by n_head=5",
        ),
        (
            "search.algorithm=optuna",
            r"search\.algorithm=optuna learns from finished trials.*or scheduler\.kind=asha",
        ),
        ("space={}", r"space: give at least one field"),
        ("metric=accuracy", r"metric 'accuracy' is not reported"),
        ("train.optim.lrr=0.1", r"train: unknown field 'optim\.lrr'"),
        ("scheduler.reduction_factor=1", r"reduction_factor must be > 1"),
        ("budget.trials=0", r"trials must be >= 1"),
        ("trial.workers=3", r"trial: global_batch_tokens=2048 is not a multiple .* x 3"),
    ],
)
def test_bad_sweeps_name_the_field(setting, message):
    with pytest.raises(ConfigError, match=message):
        plan(setting)


def test_discrete_values_are_checked_together():
    # Each value alone is fine; one combination (micro-batch 16 with a 1024-token batch) is not.
    with pytest.raises(ConfigError, match=r"global_batch_tokens=1024, micro_batch_size=16"):
        plan(
            "space={global_batch_tokens: {choice: [1024, 2048]}, micro_batch_size: {choice: [8, 16]}}",
            "search.algorithm=grid",
        )


def test_grid_needs_lists_and_transfer_refuses_width_fields():
    with pytest.raises(ConfigError, match=r"space\.optim\.lr: search grid needs a list"):
        plan("search.algorithm=grid")
    with pytest.raises(ConfigError, match=r"space\.model\.d_model: optuna samples its own points"):
        plan("search.algorithm=optuna", "scheduler.kind=asha", "space.model.d_model={grid: [64, 128]}")
    with pytest.raises(ConfigError, match=r"space\.model\.d_model: --transfer tunes at one proxy width"):
        plan("space.model.d_model={choice: [64, 128]}", transfer=True)


def test_random_search_over_lists_proposes_each_combination_once():
    lists = "space={optim.lr: {choice: [1e-3, 2e-3, 4e-3]}, optim.warmup_steps: {choice: [0, 8]}}"
    points = {
        seed: sweep._distinct_points(plan(lists, "budget.trials=4", f"search.seed={seed}")) for seed in (0, 1)
    }
    for chosen in points.values():
        assert len(chosen) == 4 and len({tuple(sorted(c.items())) for c in chosen}) == 4
    assert points[0] != points[1]  # the seed picks which
    assert len(sweep._distinct_points(plan(lists, "budget.trials=50"))) == 6  # no more than the space holds
    assert sweep._distinct_points(plan()) is None  # ranges: Tune samples them


def test_halving_waits_for_the_whole_grid():
    grid = "space={optim.lr: {grid: [1e-3, 2e-3, 4e-3]}, optim.warmup_steps: {grid: [0, 8]}}"
    assert sweep.cohort(plan(grid, "search.algorithm=grid"), 1) == 6
    assert sweep.cohort(plan(), 9) == 9


def test_mup_pair_keeps_head_width_and_everything_else():
    target = ModelConfig(vocab_size=1024, d_model=512, n_layer=3, n_head=8, n_kv_head=4, max_seq_len=64)
    proxy, wide = sweep.mup_pair(target, 128)
    assert (proxy.d_model, proxy.n_head, proxy.n_kv_head, proxy.head_dim) == (128, 2, 1, 64)
    assert proxy.n_layer == wide.n_layer == 3 and proxy.vocab_size == 1024
    assert proxy.mup and wide.mup and proxy.mup_base_width == wide.mup_base_width == 128
    assert proxy.width_mult == 1.0 and wide.width_mult == 4.0
    with pytest.raises(ConfigError, match="multiple of the head width 64"):
        sweep.mup_pair(target, 96)


def test_best_row_prefers_completed_trials():
    def row(i, last, state):
        return results.TrialRow(str(i), {"optim.lr": i}, last, last, 1, 2, state)

    rows = [row(1, 5.0, "stopped"), row(2, 6.0, "completed"), row(3, 5.5, "completed"), row(4, None, "error")]
    assert results.best_row(rows, "min").trial_id == "3"
    assert results.best_row(rows, "max").trial_id == "2"
    assert results.best_row([row(1, 5.0, "stopped")], "min").trial_id == "1"
    assert results.best_row([row(4, None, "error")], "min") is None


def test_train_settings_merge_into_the_recipe():
    p = plan("train.data.seq_len=64", "train.global_batch_tokens=1024")
    assert p.base["data"]["seq_len"] == 64 and p.base["data"]["vocab_size"] == 4096  # the rest of data kept
    cfg = space.train_config(p.base, {"optim.lr": 0.01})
    assert cfg.optim.lr == 0.01 and cfg.optim.warmup_steps == 10


def test_mup_coordinates_stay_flat_with_width_and_standard_ones_grow():
    base = ModelConfig(vocab_size=512, d_model=64, n_layer=2, n_head=2, max_seq_len=64)
    widths = [64, 128, 256, 512]
    mup = coord_check(base, widths, mup=True)
    sp = coord_check(base, widths, mup=False)
    assert set(mup.scales) == {"embedding", "block0", "block1", "logits"}
    for layer in mup.scales:  # 8x wider: every layer's activation size within 25% of the narrowest's
        assert 0.8 < mup.growth(layer) < 1.25, (layer, mup.scales[layer])
    for layer in (
        "block0",
        "block1",
        "logits",
    ):  # standard parametrization: Adam's updates blow up with width
        assert sp.growth(layer) > 4, (layer, sp.scales[layer])
    assert tiny().mup is False  # µP is a switch: the presets stay standard


def test_token_budget_stops_the_whole_sweep_once_spent():
    from ray.tune import Stopper

    from tune.budget import TokenBudget

    budget = TokenBudget(9_000)
    assert isinstance(budget, Stopper)  # so Tune asks stop_all(), not just __call__
    assert budget("a", {"tokens": 4096}) is False and not budget.stop_all()
    budget("b", {"tokens": 4096})
    budget("a", {"tokens": 4096})  # a trial's latest count replaces its earlier one: 8192 in all
    assert not budget.stop_all()
    budget("a", {"tokens": 5000})
    assert budget.stop_all()
