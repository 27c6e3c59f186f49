"""The internet-scale simulator (benchmarks/simulate.py): its cost model, its rounds, its baselines
and its command line. Pure numpy, a few seconds in all."""

import json

import numpy as np
import pytest

from benchmarks.simulate import (
    DAY,
    INPUTS,
    Scenario,
    fit_checks,
    load_costs,
    main,
    makespan,
    product_plan,
    run_rounds,
    simulate,
    sisa_plan,
)

COSTS = load_costs()
SMALL = Scenario(users=1_000_000, requests_per_day=2000, shards=1024, slices=4, workers=200, days=2)


def test_fit_reproduces_the_measured_trainings_and_predicts_the_others_within_10_percent():
    for row in json.loads(INPUTS.read_text())["shard_trainings"]:
        predicted = row["shards"] * COSTS.shard_seconds(row["samples"] / row["shards"], valid=row["valid_samples"])
        assert predicted == pytest.approx(row["seconds"], rel=1e-6), row["what"]
    for what, predicted, measured in fit_checks(COSTS):
        assert abs(predicted / measured - 1) < 0.10, what


def test_one_request_costs_one_shard_retrain_from_its_slice():
    s = Scenario(users=100_000, requests_per_day=1, shards=8, slices=4, workers=2, days=1)
    plan = product_plan(s, COSTS, 1, np.random.default_rng(3))
    done, masked_at, rounds = run_rounds(plan, s, COSTS, np.array([100.0]))
    shard, slice_ = plan.hit_shard[0], plan.hit_slice[0]
    expected = COSTS.fixed + COSTS.per_valid * 500 + COSTS.per_sample * plan.sizes[shard] * (4 - slice_) / 4
    [(_, _, compute, (touched, _, _))] = rounds
    assert compute == pytest.approx(expected)
    assert list(touched) == [shard]
    assert done[0] == pytest.approx(100.0 + expected + COSTS.round_overhead)
    assert masked_at[0] == 100.0  # masked on arrival: no cap


def test_one_request_masks_its_shard_for_exactly_its_round():
    s = Scenario(users=100_000, requests_per_day=1, shards=8, slices=1, workers=2, days=1)
    row = simulate(s, COSTS, "product", arrivals=np.array([1000.0]))
    plan = product_plan(s, COSTS, 1, np.random.default_rng([s.seed, 0]))  # the draws simulate makes
    share = plan.sizes[plan.hit_shard[0]] / plan.sizes.sum()
    assert row["served_mean"] == pytest.approx(1 - share * row["p50_done_h"] * 3600 / DAY)
    assert row["served_worst"] == pytest.approx(1 - share)


def test_more_shards_cost_less_per_forgotten_user_in_rounds_of_the_same_requests():
    """Daily rounds: every K coalesces the same requests. (With continuous rounds a small K's long
    rounds coalesce more requests, and can cost less per user: docs/scale.md.)"""
    costs = [simulate(Scenario(users=1_000_000, requests_per_day=2000, shards=k, workers=10**6, days=3, round_interval=DAY),
                      COSTS, "product")["compute_per_user_h"] for k in (64, 1024, 16384)]
    assert costs[0] > costs[1] > costs[2]


@pytest.mark.parametrize("baseline", ["sisa", "sisa-batched", "full-retrain"])
def test_baselines_cost_at_least_as_much_as_the_product(baseline):
    product = simulate(SMALL, COSTS, "product")
    other = simulate(SMALL, COSTS, baseline)
    assert other["compute_per_user_h"] >= product["compute_per_user_h"]
    assert other["requests"] == product["requests"]  # the same arrivals


def test_percentiles_are_ordered_and_a_round_takes_at_least_its_overhead():
    row = simulate(SMALL, COSTS, "product")
    assert COSTS.round_overhead / 3600 <= row["p50_done_h"] <= row["p99_done_h"]
    assert 0 <= row["served_worst"] <= row["served_mean"] <= row["served_mean_clean_prefix"] <= 1


def test_the_same_seed_gives_the_same_figures_and_another_seed_others():
    assert simulate(SMALL, COSTS, "product") == simulate(SMALL, COSTS, "product")
    assert simulate(SMALL, COSTS, "product") != simulate(Scenario(**{**SMALL.__dict__, "seed": 1}), COSTS, "product")


def test_a_mask_cap_bounds_what_each_round_masks_and_delays_masking():
    capped = Scenario(**{**SMALL.__dict__, "mask_cap": 0.05})
    plan = product_plan(capped, COSTS, 3000, np.random.default_rng(0))
    arrivals = np.sort(np.random.default_rng(1).uniform(0, DAY, 3000))
    _, masked_at, rounds = run_rounds(plan, capped, COSTS, arrivals)
    for _, _, _, (touched, _, _) in rounds:
        assert plan.sizes[touched].sum() / plan.sizes.sum() <= 0.05 or len(touched) == 1
    assert (masked_at >= arrivals).all() and (masked_at > arrivals).any()


def test_sisa_slices_cost_more_than_incremental_ones_and_spread_a_user_over_shards():
    s = Scenario(users=100_000, shards=64, slices=4)
    plan = sisa_plan(s, COSTS, 1000, np.random.default_rng(0), batched=True)
    assert plan.redone(np.array([0, 3])) == pytest.approx([1.0, 2 / 5])  # SISA's epoch rule: 2e/(R+1) a stage
    assert product_plan(s, COSTS, 1, np.random.default_rng(0)).redone(np.array([0, 3])) == pytest.approx([1.0, 1 / 4])
    assert np.diff(plan.offsets).mean() == pytest.approx(COSTS.samples_per_user, rel=0.1)


def test_makespan_takes_tasks_in_order_on_the_first_free_worker():
    assert makespan(np.array([3.0, 3.0, 2.0, 2.0]), 2) == 5.0
    assert makespan(np.array([4.0, 1.0, 1.0, 1.0]), 2) == 4.0
    assert makespan(np.array([4.0]), 8) == 4.0


@pytest.mark.parametrize("argv, named", [
    (["--partition", "random"], "--partition"), (["--shards", "0"], "--shards"), (["--slices", "0"], "--slices"),
    (["--workers", "-1"], "--workers"),
    (["--mask-cap", "1.5"], "--mask-cap"), (["--round-interval", "-5"], "--round-interval"),
    (["--methods", "product,nope"], "--methods"), (["--users", "10", "--shards", "100"], "--shards"),
    (["--requests-per-day", "1e9"], "--requests-per-day"), (["--days", "abc"], "--days"),
])
def test_bad_arguments_exit_2_naming_the_argument(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


def test_the_command_prints_a_row_per_method(capsys):
    assert main(["--users", "100000", "--requests-per-day", "100", "--shards", "64", "--workers", "8", "--days", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "method" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["product", "sisa", "sisa-batched", "full-retrain"]


def test_shards_as_unequal_as_the_measured_semantic_user_ones_take_longer_than_user_hash_shards():
    user = simulate(SMALL, COSTS, "product")
    semantic = simulate(Scenario(**{**SMALL.__dict__, "partition": "semantic-user"}), COSTS, "product")
    assert semantic["p99_done_h"] > user["p99_done_h"]
    assert semantic["served_mean"] < user["served_mean"]
