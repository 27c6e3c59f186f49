"""Issue 3, without Ray: shards and slices are pure functions; resuming equals training through."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from components.checkpoints import SliceCheckpoints
from components.config import DataConfig, PartitionConfig
from components.data import build_samples, load_interactions_and_items, split_by_time
from components.model import decoder_of, embed, load_base_model, load_tokenizer, make_deterministic, tokenize, trunk_pass
from components.partition import Partitioner, reference_prompts, slice_of
from components.train import train_shard


@pytest.fixture(scope="module")
def world(tiny_config):
    make_deterministic(1)
    tokenizer = load_tokenizer(tiny_config.model)
    model = load_base_model(tiny_config.model, tiny_config.seed, tokenizer)
    inter, items = load_interactions_and_items(DataConfig())
    splits = split_by_time(build_samples(inter, items, tiny_config.data), tiny_config.data, tiny_config.seed)
    prompts = reference_prompts(items, 64, 10, seed=1)
    reference = embed(model, tokenizer, prompts, tiny_config.model)
    train = splits["train"]
    train_emb = embed(model, tokenizer, train["prompt"].tolist(), tiny_config.model)
    samples = pd.concat([train.head(40), splits["valid"]])
    states = {s: trunk_pass(model, tokenize(tokenizer, [p], tiny_config.model.max_length), tiny_config.model).states[0]
              for s, p in zip(samples["sample_id"], samples["prompt"])}
    return {"tokenizer": tokenizer, "items": items, "splits": splits, "reference": reference, "model": model,
            "train": train, "train_emb": train_emb, "prompts": prompts,
            "states_of": lambda rows: [states[s] for s in rows["sample_id"]]}


def _train(world, config, train, checkpoints):
    return train_shard(config, 0, train, world["splits"]["valid"], SliceCheckpoints(checkpoints), copy.deepcopy(world["model"]),
                       world["tokenizer"], world["states_of"])


def test_reference_set_is_catalogue_only_and_seeded(world):
    again = reference_prompts(world["items"], 64, 10, seed=1)
    assert again == world["prompts"]
    assert reference_prompts(world["items"], 64, 10, seed=2) != world["prompts"]
    titles = set(world["items"]["title"])
    assert all(any(t in p for t in titles) for p in world["prompts"][:5])


@pytest.mark.parametrize("method", ["semantic", "adaptive", "random", "user"])
def test_removing_a_sample_moves_no_other_sample(world, method):
    config = PartitionConfig(method=method, num_shards=4, distance_threshold=0.9, min_cluster_size=4)
    partitioner = Partitioner.fit(config, 7, world["reference"])
    train, emb = world["train"], world["train_emb"]
    shards = partitioner.assign(train, emb)
    slices = slice_of(train["user_id"], 4, 7)
    for drop in (0, len(train) // 2):
        keep = np.arange(len(train)) != drop
        rest = train[keep].reset_index(drop=True)
        assert np.array_equal(partitioner.assign(rest, emb[keep]), shards[keep])
        assert np.array_equal(slice_of(rest["user_id"], 4, 7), slices[keep])
    assert len(set(shards)) > 1


def test_semantic_user_shards_keep_a_user_together_and_move_only_a_partly_removed_user(world):
    partitioner = Partitioner.fit(PartitionConfig(method="semantic-user", num_shards=4), 7, world["reference"])
    train, emb = world["train"], world["train_emb"]
    shards = partitioner.assign(train, emb)
    assert train.assign(shard=shards).groupby("user_id")["shard"].nunique().max() == 1
    assert len(set(shards)) > 1
    shuffled = np.random.default_rng(0).permutation(len(train))  # the frame's order does not matter
    assert np.array_equal(partitioner.assign(train.iloc[shuffled], emb[shuffled]), shards[shuffled])
    moved_users = set()
    for drop in range(len(train)):  # remove one sample at a time: only its own user may move
        keep = np.arange(len(train)) != drop
        after = partitioner.assign(train[keep].reset_index(drop=True), emb[keep])
        others = (train["user_id"] != train["user_id"].iloc[drop]).to_numpy()[keep]
        assert np.array_equal(after[others], shards[keep][others])
        if not np.array_equal(after[~others], shards[keep][~others]):
            moved_users.add(train["user_id"].iloc[drop])
    assert moved_users  # removing part of a user's samples can move the rest: forgetting handles it


def test_a_users_samples_share_one_slice_and_the_slices_are_used(world):
    train = world["train"]
    slices = train.assign(slice=slice_of(train["user_id"], 4, 7)).groupby("user_id")["slice"].nunique()
    assert (slices == 1).all()
    assert set(slice_of(train["user_id"], 4, 7)) == {0, 1, 2, 3}


def test_semantic_centroids_are_balanced_on_the_reference_set(world):
    partitioner = Partitioner.fit(PartitionConfig(method="semantic", num_shards=4), 7, world["reference"])
    sizes = np.bincount(partitioner.nearest(world["reference"]), minlength=4)
    assert sizes.min() >= 8  # 64 reference prompts, 16 per centroid when perfectly balanced


def test_adaptive_partition_finds_more_clusters_for_a_smaller_threshold(world):
    counts = [Partitioner.fit(PartitionConfig(method="adaptive", distance_threshold=t, min_cluster_size=2), 7,
                              world["reference"]).num_shards for t in (0.3, 0.8, 1.0)]
    assert counts[0] > counts[1] > counts[2] >= 1, counts


def test_small_adaptive_clusters_merge_into_neighbours(world):
    partitioner = Partitioner.fit(PartitionConfig(method="adaptive", distance_threshold=0.3, min_cluster_size=12), 7, world["reference"])
    sizes = np.bincount(partitioner.nearest(world["reference"]), minlength=partitioner.num_shards)
    assert partitioner.num_shards < 64 // 12 + 1
    assert sizes.sum() == 64


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_resuming_from_a_slice_checkpoint_equals_training_straight_through(world, tiny_config, tmp_path, kind):
    config = tiny_config.model_copy(update={"adapter": tiny_config.adapter.model_copy(update={"kind": kind})})
    train = world["train"].head(40).assign(slice=lambda f: slice_of(f["user_id"], 4, 7))
    through = _train(world, config, train, tmp_path / "a")
    assert through.restarted_from == 0 and len(list((tmp_path / "a").glob("slice-*/checkpoint.pt"))) == 4
    SliceCheckpoints(tmp_path / "a").remove(3)
    cut_short = tmp_path / "a" / "slice-2" / "checkpoint.pt"  # a copy into storage interrupted by a failure
    cut_short.write_bytes(cut_short.read_bytes()[: cut_short.stat().st_size // 2])
    legacy = tmp_path / "a" / "slice-3.pt"  # a checkpoint file as work dirs kept them before Ray Train
    legacy.write_bytes(b"trained on data since forgotten")
    resumed = _train(world, config, train, tmp_path / "a")
    assert resumed.restarted_from == 2 and not legacy.exists()
    assert all(torch.equal(through.adapter[k], resumed.adapter[k]) for k in through.adapter)
    assert np.array_equal(through.valid_predictions, resumed.valid_predictions)
    assert through.losses == resumed.losses
    assert through.losses[0] != through.losses[-1]  # it trained


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a node without CUDA")
def test_a_shard_asking_for_a_gpu_on_a_node_without_cuda_fails_at_start(world, tiny_config, tmp_path):
    config = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"gpus_per_actor": 0.25})})
    with pytest.raises(RuntimeError, match="gpus_per_actor is 0.25 but .* sees no CUDA device"):
        _train(world, config, world["train"].head(8).assign(slice=0), tmp_path)
    assert not list(tmp_path.glob("slice-*"))


def test_a_changed_slice_invalidates_its_checkpoint_and_later_ones(world, tiny_config, tmp_path):
    train = world["train"].head(40).assign(slice=lambda f: slice_of(f["user_id"], 4, 7))
    _train(world, tiny_config, train, tmp_path)
    victim = train[train["slice"] == 2].index[0]
    after = _train(world, tiny_config, train.drop(index=victim), tmp_path)
    assert after.restarted_from == 2
    scratch = _train(world, tiny_config, train.drop(index=victim), tmp_path / "scratch")
    assert all(torch.equal(after.adapter[k], scratch.adapter[k]) for k in after.adapter)


def test_the_trunk_runs_on_the_configured_threads_whoever_calls_and_gives_them_back(world, tiny_config):
    # A state's bits can depend on the thread count (SmolLM2 on 2 cores: 1 and 2 threads differ), so
    # the store, serving and the embeddings must all run the trunk on model.trunk_threads.
    model_config = tiny_config.model.model_copy(update={"trunk_layers": 1, "trunk_threads": 3})
    seen = []
    hook = decoder_of(world["model"]).layers[0].register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    batch = tokenize(world["tokenizer"], world["prompts"][:1], model_config.max_length)
    try:
        for caller_threads in (1, 2):
            torch.set_num_threads(caller_threads)
            trunk_pass(world["model"], batch, model_config)
            assert torch.get_num_threads() == caller_threads
        embed(world["model"], world["tokenizer"], world["prompts"][:1], model_config)
    finally:
        hook.remove()
        make_deterministic(1)
    assert seen == [3, 3, 3]
