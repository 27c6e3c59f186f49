"""Issue 2: real MovieLens-100K from the recbole package, samples, splits, config, tiny model."""

import numpy as np
import pandas as pd
import pytest

from components.config import ConfigError, DataConfig, ModelConfig, load_config
from components.data import DataError, build_samples, load_interactions_and_items, split_by_time
from components.model import load_base_model, load_tokenizer, score

from .conftest import ROOT, TINY


@pytest.fixture(scope="module")
def movielens():
    return load_interactions_and_items(DataConfig())


@pytest.fixture(scope="module")
def samples(movielens):
    return build_samples(*movielens, DataConfig())


def test_movielens_loader_finds_the_whole_dataset(movielens):
    inter, items = movielens
    assert len(inter) == 100_000
    assert inter["user_id"].nunique() == 943
    assert len(items) == 1682
    assert items["title"].str.len().min() > 0


def test_history_never_reaches_the_target_time(movielens, samples):
    inter, _ = movielens
    when = {f"{u}:{i}": t for u, i, t in zip(inter["user_id"], inter["item_id"], inter["timestamp"])}
    for row in samples.sample(3000, random_state=0).itertuples():
        *history, target = row.interactions
        assert target == row.sample_id
        assert len(history) == 10
        assert all(when[h] < when[target] for h in history), row.sample_id


def test_labels_follow_the_rating_rule(movielens, samples):
    inter, _ = movielens
    rating = {f"{u}:{i}": r for u, i, r in zip(inter["user_id"], inter["item_id"], inter["rating"])}
    expected = samples["sample_id"].map(lambda s: int(rating[s] > 3))
    assert (samples["label"] == expected).all()
    assert 0.3 < samples["label"].mean() < 0.8  # both classes are there


def test_sample_ids_are_stable_across_builds(movielens, samples):
    again = build_samples(*movielens, DataConfig())
    assert samples["sample_id"].tolist() == again["sample_id"].tolist()
    assert samples["prompt"].tolist() == again["prompt"].tolist()
    assert samples["sample_id"].is_unique


def test_splits_are_ordered_in_time_and_sized(samples):
    config = DataConfig(n_train=200, n_valid=50, n_test=60)
    splits = split_by_time(samples, config, seed=0)
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [200, 50, 60]
    assert splits["train"]["timestamp"].max() < splits["valid"]["timestamp"].min()
    assert splits["valid"]["timestamp"].max() < splits["test"]["timestamp"].min()
    assert splits["valid"]["user_id"].nunique() > 5  # not one user's session


def test_users_own_csv_with_a_missing_column_names_it(tmp_path):
    pd.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [3]}).to_csv(tmp_path / "inter.csv", index=False)
    pd.DataFrame({"item_id": [2], "title": ["Heat"]}).to_csv(tmp_path / "items.csv", index=False)
    config = DataConfig(source="files", interactions_path=str(tmp_path / "inter.csv"), items_path=str(tmp_path / "items.csv"))
    with pytest.raises(DataError, match="rating"):
        load_interactions_and_items(config)


def test_users_own_parquet_files_build_samples(tmp_path):
    rng = np.random.default_rng(0)
    inter = pd.DataFrame({"user_id": np.repeat([1, 2], 15), "item_id": np.tile(np.arange(15), 2),
                          "rating": rng.integers(1, 6, 30), "timestamp": np.tile(np.arange(15) * 10, 2)})
    inter.to_parquet(tmp_path / "inter.parquet")
    pd.DataFrame({"item_id": np.arange(15), "title": [f"Film {i}" for i in range(15)]}).to_parquet(tmp_path / "items.parquet")
    config = DataConfig(source="files", interactions_path=str(tmp_path / "inter.parquet"), items_path=str(tmp_path / "items.parquet"))
    samples = build_samples(*load_interactions_and_items(config), config)
    assert len(samples) == 2 * 5  # 15 interactions, the first 10 are only history
    with pytest.raises(DataError, match="unknown file format"):
        load_interactions_and_items(config.model_copy(update={"items_path": str(tmp_path / "items.json")}))


def test_config_rejects_unknown_and_ill_typed_keys(tmp_path):
    assert load_config(TINY).partition.num_shards == 2
    assert load_config(ROOT / "configs" / "movielens.yaml").model.name == "smollm2-135m"
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: x\ntrain:\n  epochz: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml[\s\S]*train\.epochz: unknown key"):
        load_config(bad)
    bad.write_text("experiment: x\npartition:\n  num_shards: many\n")
    with pytest.raises(ConfigError, match=r"partition\.num_shards"):
        load_config(bad)


def test_tiny_model_scores_are_probabilities_and_deterministic():
    prompts = ['User Preference: "Heat (1995)"\nWhether the user will like the target movie "Fargo (1996)"?\nAnswer:'] * 2
    config = ModelConfig(name="tiny-llama", max_length=128, trunk_layers=1)
    tokenizer = load_tokenizer(config)
    first = score(load_base_model(config, 3, tokenizer), tokenizer, prompts, config)
    second = score(load_base_model(config, 3, tokenizer), tokenizer, prompts, config)
    other_seed = score(load_base_model(config, 4, tokenizer), tokenizer, prompts, config)
    assert ((first > 0) & (first < 1)).all()
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other_seed)


@pytest.mark.slow
@pytest.mark.ci
def test_converted_smollm2_loads_offline_and_scores_a_real_prompt(samples):
    tokenizer = load_tokenizer(ModelConfig())
    model = load_base_model(ModelConfig(), 0)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    p = score(model, tokenizer, samples["prompt"].head(2).tolist(), ModelConfig())
    assert ((p > 0) & (p < 1)).all() and p[0] != p[1]


def test_retrain_baseline_is_one_unsliced_adapter_on_its_own_cores():
    from components.baselines import baseline_config, baseline_sha256
    from components.train import training_sha256

    config = load_config(TINY)
    retrain = baseline_config(config, "retrain")
    assert (retrain.partition.num_shards, retrain.partition.num_slices) == (1, 1)
    assert retrain.train.cpus_per_actor == config.train.cpus_per_actor  # retrain_cpus unset
    given = config.model_copy(update={"train": config.train.model_copy(update={"retrain_cpus": 2})})
    assert baseline_config(given, "retrain").train.cpus_per_actor == 2
    assert baseline_config(given, "sisa").train.cpus_per_actor == config.train.cpus_per_actor
    # Resources are not part of what a checkpoint or a baseline depends on: no retraining for them.
    assert training_sha256(given) == training_sha256(config)
    assert baseline_sha256(baseline_config(given, "sisa")) == baseline_sha256(baseline_config(config, "sisa"))


def test_a_soft_prompt_trains_at_its_own_rate_which_lora_ignores():
    from components.baselines import baseline_config, baseline_sha256
    from components.train import learning_rate, training_sha256

    config = load_config(TINY)
    given = config.model_copy(update={"train": config.train.model_copy(update={"prompt_learning_rate": 0.03})})
    assert learning_rate(given) == config.train.learning_rate
    assert learning_rate(baseline_config(given, "lmeraser")) == 0.03
    assert learning_rate(baseline_config(config, "lmeraser")) == config.train.learning_rate  # unset: LoRA's
    # LoRA checkpoints and baselines do not depend on it (nothing retrains); the prompts' do.
    assert training_sha256(given) == training_sha256(config)
    assert baseline_sha256(baseline_config(given, "sisa")) == baseline_sha256(baseline_config(config, "sisa"))
    assert baseline_sha256(baseline_config(given, "lmeraser")) != baseline_sha256(baseline_config(config, "lmeraser"))
