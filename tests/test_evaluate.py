"""Issue 7: the comparison table. Every method on the test split, AUCs that the stored predictions
reproduce, APA recomputed from the live adapter set, plots, the MLflow run, and bad input.
Issue 13: the no-model floors and the bootstrap intervals, recomputed from the stored files."""

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from components.aggregate import AggregatorState, load_mixture, predict, stored_inputs
from components.data import SPLITS, interaction_id, load_interactions_and_items, read_parquet, write_parquet
from components.eval_report import floor_verdict
from components.metrics import auc, paired_difference_interval
from components.model import load_base_model, load_tokenizer
from components.partition import Partitioner
from components.registry import Registry
from components.store import Workdir, load_splits
from components.train import ADAPTER_FILE
from components.unlearn import new_request
from ray_jobs import evaluate as evaluate_job
from ray_jobs import rounds
from ray_jobs import train as train_job

from .conftest import TINY

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def small(config):
    """The tiny config, smaller still: for the slow test's own work dir, its forgets and baselines."""
    return config.model_copy(update={
        "data": config.data.model_copy(update={"n_train": 64, "n_valid": 16, "n_test": 24}),
        "partition": config.partition.model_copy(update={"num_slices": 2, "min_cluster_size": 24}),
    })


# make test evaluates the session's trained work dir with every method but those whose baselines are
# more trainings (SISA, the user partition, LMEraser): make test-slow evaluates those on the same work dir.
SUITE_METHODS = [m for m in evaluate_job.DEFAULT_METHODS if m not in ("sisa", "user", "lmeraser")]


@pytest.fixture(scope="module")
def evaluated(trained_tiny, tiny_config):
    """The session's trained work dir, evaluated: the retrain baseline trained on its store under
    DIR/baselines, the reports beside the training's. Nothing here changes its live adapter set."""
    workdir = trained_tiny[0]
    report = evaluate_job.run(tiny_config, workdir, SUITE_METHODS, forget_cost_mode="existing")
    return tiny_config, workdir, report


def training_users(workdir):
    return sorted(set(read_parquet(workdir.split("train"))["user_id"].astype(str)))


def test_every_method_has_a_finite_auc_that_its_stored_predictions_reproduce(evaluated):
    config, workdir, report = evaluated
    on_disk = json.loads(workdir.path("reports", "eval.json").read_text())
    assert on_disk["methods"].keys() == report["methods"].keys()
    shards = [f"shard-{k}" for k in range(config.partition.num_shards)]
    assert list(report["methods"]) == [m for m in evaluate_job.METHODS if m in SUITE_METHODS] + [*shards, *evaluate_job.FLOORS]

    labels = np.load(workdir.path("reports", "predictions", "labels.npy"))
    test = load_splits(workdir)["test"]
    assert labels.tolist() == test["label"].astype(int).tolist() and 0 < labels.sum() < len(labels)
    table = workdir.path("reports", "eval.md").read_text()
    for name, row in on_disk["methods"].items():
        assert math.isfinite(row["auc"]), name
        assert row["n_test"] == len(test) and (name in evaluate_job.FLOORS or row["latency_ms"] > 0)
        assert row["predictions"] == f"reports/predictions/{name}.npy"
        scores = np.load(workdir.path(row["predictions"]))
        assert scores.shape == (len(test),) and np.isfinite(scores).all()
        assert ((scores >= 0) & (scores <= (2 if name == "floor-sum" else 1))).all(), name  # P(yes), a share, a mean label
        assert auc(labels, scores) == row["auc"], name
        assert f"| {name} | {row['auc']:.4f} |" in table, name
    for header in ("machine:", "date:", "config:", str(TINY.name) if on_disk["config_file"] else "(in-process)"):
        assert header in table
    assert_baselines_trained_apart(config, workdir, ["retrain"])
    assert on_disk["methods"]["retrain"]["adapters"] == 1
    # One adapter on all the data, trained as one slice: its forgetting is retraining from scratch.
    retrain_checkpoints = Workdir(workdir.path("baselines", "retrain")).checkpoints(0)
    assert retrain_checkpoints.stages() == ["slice-0"]
    assert len(workdir.checkpoints(0).stages()) == config.partition.num_slices > 1


def assert_baselines_trained_apart(config, workdir, names):
    """Baselines are trained in their own work dirs under their own experiments."""
    for name in names:
        assert workdir.path("baselines", name, "reports", "train.json").exists()
        assert Registry(f"{config.experiment}-{name}", workdir.path("baselines", name)).live_set_version() is not None


def bootstrap_aucs(labels, scores, draws):
    """The AUC of each resample by its definition, the share of (positive, negative) pairs the scores
    order right, ties counting half (sklearn's AUC on a resample row by row took ~30 s here); None
    where a resample has one class."""
    y, s = labels[draws].astype(bool), scores[draws]
    pairs = y[:, :, None] & ~y[:, None, :]
    right = (s[:, :, None] > s[:, None, :]) + 0.5 * (s[:, :, None] == s[:, None, :])
    counts = pairs.sum(axis=(1, 2))
    return [float(r) / c if c else None for r, c in zip((right * pairs).sum(axis=(1, 2)), counts)]


def percentiles(values):
    values = [v for v in values if v is not None]
    return np.percentile(values, [2.5, 97.5]).tolist()


def test_floors_and_intervals_are_computed_from_the_stored_predictions_and_the_store(evaluated):
    config, workdir, report = evaluated
    on_disk = json.loads(workdir.path("reports", "eval.json").read_text())
    labels = np.load(workdir.path("reports", "predictions", "labels.npy"))
    test, train = load_splits(workdir)["test"], read_parquet(workdir.split("train"))
    stored = {name: np.load(workdir.path(row["predictions"])) for name, row in on_disk["methods"].items()}

    # The floors, recomputed here: liked history titles from the source ratings, item means from
    # the training split as it is now (a forgotten user's samples are not in it).
    inter, _ = load_interactions_and_items(config.data)
    rating = {interaction_id(u, i): r for u, i, r in zip(inter["user_id"], inter["item_id"], inter["rating"])}
    history = [row.interactions[:-1] for row in test.itertuples()]
    share = [sum(rating[h] > config.data.like_threshold for h in ids) / len(ids) for ids in history]
    by_item = {}
    for item, label in zip(train["item_id"].astype(str), train["label"]):
        by_item.setdefault(item, []).append(label)
    item_mean = [np.mean(by_item.get(item, train["label"])) for item in test["item_id"].astype(str)]
    assert not all(item in by_item for item in test["item_id"].astype(str))  # the fallback is exercised
    expected = {"floor-history": np.array(share), "floor-item": np.array(item_mean)}
    expected["floor-sum"] = expected["floor-history"] + expected["floor-item"]
    for name, scores in expected.items():
        assert stored[name] == pytest.approx(scores, abs=1e-12), name
        assert on_disk["methods"][name]["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12), name

    # Every interval, recomputed from the .npy files by drawing the resampled rows themselves.
    boot = on_disk["bootstrap"]
    assert boot["resamples"] == evaluate_job.BOOTSTRAP_RESAMPLES and boot["seed"] == config.seed
    draws = np.random.default_rng(boot["seed"]).integers(0, len(labels), size=(boot["resamples"], len(labels)))
    resampled = {name: bootstrap_aucs(labels, scores, draws) for name, scores in stored.items()}
    table = workdir.path("reports", "eval.md").read_text()
    for name, row in on_disk["methods"].items():
        low, high = percentiles(resampled[name])
        assert row["auc_ci95"] == pytest.approx([low, high], abs=1e-6), name
        assert low <= high and f"| {name} | {row['auc']:.4f} | [{row['auc_ci95'][0]:.4f}, {row['auc_ci95'][1]:.4f}] |" in table

    # Paired differences: the same resampled rows for both methods.
    assert set(on_disk["paired"]) == {"apa - retrain", "retrain - floor-history", "retrain - floor-item"}
    for name, pair in on_disk["paired"].items():
        a, b = pair["a"], pair["b"]
        assert name == f"{a} - {b}" and pair["n"] == len(labels)
        assert pair["difference"] == on_disk["methods"][a]["auc"] - on_disk["methods"][b]["auc"]
        differences = [x - y if x is not None else None for x, y in zip(resampled[a], resampled[b])]
        assert pair["ci95"] == pytest.approx(percentiles(differences), abs=1e-6), name
        assert f"| {name} | {pair['difference']:+.4f} | [{pair['ci95'][0]:+.4f}, {pair['ci95'][1]:+.4f}] | {len(labels)} |" in table
    # Unpaired resampling would not give a method minus itself [0, 0].
    assert paired_difference_interval(labels, stored["apa"], stored["apa"], boot["seed"]) == (0.0, 0.0)

    # The plain sentence, and the intervals as MLflow metrics.
    aucs = {m: r["auc"] for m, r in on_disk["methods"].items()}
    verdict = "yes" if aucs["retrain"] > max(aucs["floor-history"], aucs["floor-item"]) else "no"
    assert f"Does retrain beat both no-model floors? {verdict}." in table
    registry = Registry(config.experiment, workdir.root)
    metrics = registry.client.get_run(on_disk["mlflow_run_id"]).data.metrics
    for name, row in on_disk["methods"].items():
        assert [metrics[f"auc_ci95_low_{name}"], metrics[f"auc_ci95_high_{name}"]] == pytest.approx(row["auc_ci95"]), name
    assert metrics["auc_diff_ci95_low_apa_vs_retrain"] == pytest.approx(on_disk["paired"]["apa - retrain"]["ci95"][0])


def test_the_apa_auc_is_what_the_live_adapter_set_predicts(evaluated):
    config, workdir, report = evaluated
    test = load_splits(workdir)["test"]
    torch.set_num_threads(report["machine"]["torch_threads"])
    with tempfile.TemporaryDirectory() as tmp:
        live = Registry(config.experiment, workdir.root).load_adapter_set(Path(tmp))
        files = {k: Path(v["local"]) / ADAPTER_FILE for k, v in live.shards.items()}
        assert sorted(files) == list(range(config.partition.num_shards))
        state = AggregatorState.load(live.folder / "aggregator")
        partitioner = Partitioner.load(live.folder / "aggregator" / "partitioner.npz")
        tokenizer = load_tokenizer(config.model)
        base = load_base_model(config.model, config.seed, tokenizer, head_only=True)
        mixture = load_mixture(config, files, tokenizer, base)
        states = workdir.trunk.read(test["sample_id"])  # the head runs over the stored trunk states
        step = evaluate_job.PREDICT_BATCH
        batches = [stored_inputs(states[i : i + step], test["embedding"].iloc[i : i + step]) for i in range(0, len(test), step)]
        scores, weights, _ = predict(config, mixture, batches, state, partitioner, method="attention")
    assert weights.shape == (len(test), config.partition.num_shards)
    assert auc(test["label"], scores) == pytest.approx(report["methods"]["apa"]["auc"], abs=1e-12)
    assert np.array_equal(scores, np.load(workdir.path("reports", "predictions", "apa.npy")))  # bit for bit


def test_forget_cost_plots_and_the_mlflow_run(evaluated):
    config, workdir, report = evaluated
    # No forget request in the work dir and none asked for: APA's cost is not measured (make
    # test-slow reads it from an audit); retrain's is its train job, forgetting being retraining.
    assert set(report["forget_cost"]) == {"retrain"} and not workdir.path("baselines", "forget-cost").exists()
    retrain = report["forget_cost"]["retrain"]
    assert retrain["forget_seconds"] == retrain["full_retrain_seconds"] > 0 and retrain["ratio"] == 1.0
    assert "| retrain |" in workdir.path("reports", "eval.md").read_text().split("## Forgetting")[1]

    for plot in ("auc.png", "cost.png"):
        data = workdir.path("reports", plot).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, plot

    registry = Registry(config.experiment, workdir.root)
    [run] = registry.client.search_runs([registry.experiment_id], "attributes.run_name = 'evaluate'")
    assert run.info.run_id == report["mlflow_run_id"] and run.info.status == "FINISHED"
    for name, row in report["methods"].items():
        assert run.data.metrics[f"auc_{name}"] == pytest.approx(row["auc"]), name
    logged = set(registry.run_artifacts(run.info.run_id))
    assert {"evaluation/eval.json", "evaluation/eval.md", "evaluation/auc.png", "evaluation/cost.png"} <= logged


@pytest.mark.slow  # a second whole evaluation and SISA's baseline: make test-slow
def test_a_second_run_reuses_the_baselines_and_scores_the_same(evaluated):
    config, workdir, report = evaluated
    retrain = workdir.path("baselines", "retrain", "reports", "train.json").read_text()
    again = evaluate_job.run(config, workdir, ["sisa", "retrain", "shard-0"], forget_cost_mode="existing")
    assert list(again["methods"]) == ["retrain", "sisa", "shard-0", *evaluate_job.FLOORS]
    for name in ("retrain", "shard-0", *evaluate_job.FLOORS):
        assert again["methods"][name]["auc"] == report["methods"][name]["auc"], name
    assert workdir.path("baselines", "retrain", "reports", "train.json").read_text() == retrain  # reused
    assert_baselines_trained_apart(config, workdir, ["sisa"])
    assert again["methods"]["sisa"]["aggregate"] == "average" and again["methods"]["sisa"]["adapters"] == config.partition.num_shards
    # eval.json describes the latest run only; stale predictions are gone.
    assert sorted(p.stem for p in workdir.path("reports", "predictions").glob("*.npy")) == sorted(
        ["labels", "retrain", "shard-0", "sisa", *evaluate_job.FLOORS])
    assert set(again["paired"]) == {"retrain - floor-history", "retrain - floor-item"}  # no APA in this run


@pytest.mark.slow  # two more baselines' trainings: make test-slow
def test_the_user_partition_and_lmeraser_are_evaluated_beside_the_others(evaluated):
    config, workdir, report = evaluated
    again = evaluate_job.run(config, workdir, ["user", "lmeraser", "retrain"], forget_cost_mode="none")
    assert list(again["methods"]) == ["retrain", "user", "lmeraser", *evaluate_job.FLOORS]
    assert again["methods"]["retrain"]["auc"] == report["methods"]["retrain"]["auc"]  # reused, not retrained
    assert_baselines_trained_apart(config, workdir, evaluate_job.BASELINES)
    assert again["methods"]["user"]["aggregate"] == "average" and again["methods"]["lmeraser"]["aggregate"] == "routing"
    for name in ("user", "lmeraser"):
        assert math.isfinite(again["methods"][name]["auc"]) and again["methods"][name]["latency_ms"] > 0, name


def test_a_store_without_the_history_counts_is_evaluated_without_the_history_floor(tmp_path):
    """A store prepared before the counts existed: the evaluation says so and goes on (rebuilding
    the store from the source data would bring back what it has forgotten)."""
    workdir = Workdir(tmp_path)
    train = pd.DataFrame({"item_id": ["1", "1", "2", "3"], "label": [1, 1, 0, 1]})
    test = pd.DataFrame({"item_id": ["1", "2", "4", "3"], "label": [1, 0, 0, 1]})
    write_parquet(train, workdir.split("train"))
    out = workdir.path("reports", "predictions")
    out.mkdir(parents=True)
    rows, skipped = evaluate_job.score_floors(workdir, test, out)
    assert list(rows) == ["floor-item"] and "n_liked" in skipped
    assert np.load(workdir.path(rows["floor-item"]["predictions"])).tolist() == [1.0, 0.0, 0.75, 1.0]
    assert rows["floor-item"]["auc"] == 1.0
    report = {"methods": {"retrain": {"auc": 0.6}, **rows}, "floors_skipped": skipped, "paired": {}}
    assert floor_verdict(report) == f"Retrain against the no-model floors: only floor-item 1.0000 could be computed ({skipped})."


@pytest.mark.parametrize("methods", ["apa,bogus", "shard-x", ","])
def test_bad_methods_exit_2_with_a_message(methods, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_job.main(["--config", str(TINY), "--workdir", str(tmp_path / "w"), "--methods", methods])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and ("bogus" in err or "shard-x" in err or "no method" in err), err
    assert not (tmp_path / "w").exists()  # rejected before anything is trained


@pytest.mark.slow  # a work dir of its own, its forgets and the user partition's: make test-slow
def test_a_user_forgotten_in_the_work_dir_leaves_the_baselines_too_and_a_forget_cost_is_measured(trained_tiny, tiny_config,
                                                                                               tmp_path):
    """A work dir of its own (it forgets): its baseline forgets what it forgot before it is scored,
    APA's forget cost comes from the work dir's own audit, the baseline's is measured."""
    config = small(tiny_config)
    workdir = Workdir(tmp_path / "forgets")
    train_job.run(config, workdir, states_from=trained_tiny[0])
    before = evaluate_job.run(config, workdir, ["user"], forget_cost_mode="none")
    baseline = Workdir(workdir.path("baselines", "user"))
    held = set(read_parquet(baseline.split("train"))["user_id"].astype(str))
    user = sorted(u for u in training_users(workdir) if u in held)[0]
    new_request(workdir, [user], [], "forget-in-main")
    rounds.process(config, workdir)

    again = evaluate_job.run(config, workdir, ["apa", "user"], forget_cost_mode="measure")
    # 1. The baseline forgot what the work dir forgot (with the forget job), before it was scored.
    for split in SPLITS:
        assert user not in set(read_parquet(baseline.split(split))["user_id"].astype(str)), split
    live = Registry(f"{config.experiment}-user", baseline.root).live_set_version()
    assert str(live) != str(before["methods"]["user"]["adapter_set_version"])
    assert str(again["methods"]["user"]["adapter_set_version"]) == str(live)
    assert again["n_test"] == len(load_splits(workdir)["test"])
    # 2. APA's cost comes from the audit of the work dir's own forget request; its train job is the full retrain.
    apa = again["forget_cost"]["apa"]
    [audit] = list(workdir.path("audit").glob("*.json"))
    assert apa["source"] == str(workdir.path("audit")) and apa["requests"] == 1
    assert apa["forget_seconds"] == pytest.approx(sum(json.loads(audit.read_text())["seconds"].values()), abs=1e-3)
    assert apa["full_retrain_seconds"] == json.loads(workdir.path("reports", "train.json").read_text())["seconds"]
    assert apa["ratio"] == pytest.approx(apa["full_retrain_seconds"] / apa["forget_seconds"], rel=1e-2)
    assert "| apa |" in workdir.path("reports", "eval.md").read_text().split("## Forgetting")[1]
    # 3. The forget cost of user-based shards, measured by forgetting one more user there.
    cost = again["forget_cost"]["user"]
    audits = sorted(p.stem for p in baseline.path("audit").glob("*.json"))
    assert len(audits) == 2 and evaluate_job.FORGET_COST_REQUEST in audits
    assert cost["source"] == str(baseline.path("audit")) and cost["requests"] == 1
    assert cost["forget_seconds"] > 0 and cost["ratio"] == pytest.approx(cost["full_retrain_seconds"] / cost["forget_seconds"], rel=1e-2)
    assert cost["shards_retrained"] == 1  # user-based shards: a user's samples all sit in one shard
    assert len(held - set(read_parquet(baseline.split("train"))["user_id"].astype(str))) == 2
    assert "after 2 forget request(s)" in again["methods"]["user"]["notes"]
    data = workdir.path("reports", "cost.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
