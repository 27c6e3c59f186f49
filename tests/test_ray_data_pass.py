"""Issue 28, item 1: the store's per-sample pass is Ray Data batch inference over an actor pool."""

import os

import numpy as np
import pytest
import torch

from components.data import load_interactions_and_items
from components.model import STATE_DTYPES, embed, load_base_model, load_tokenizer, make_deterministic, tokenize, trunk_pass
from components.partition import reference_prompts
from components.store import Workdir, by_token_count, load_splits, prepare
from ray_jobs.passes import StorePass, embed_pass

# Batched states against one-at-a-time ones: the stored float16 states within one float16 step of
# values ~1 (2**-10), the float32 embeddings within 1e-5. On this CPU they are equal bit for bit
# (a worker batches prompts of one token count only, unpadded): asserted too, as serving relies on it.
STATE_ATOL, EMBEDDING_ATOL = 2**-10, 1e-5


@pytest.fixture(scope="module")
def model(tiny_config):
    make_deterministic(1)
    tokenizer = load_tokenizer(tiny_config.model)
    return load_base_model(tiny_config.model, tiny_config.seed, tokenizer), tokenizer


def ray_prepare(config, workdir, tokenizer):
    store_pass = StorePass(config, workdir, tokenizer)
    splits = prepare(config, workdir, None, tokenizer, log=lambda m: None, compute=store_pass)
    return splits, store_pass


def alone(model, tokenizer, config, prompt):
    return trunk_pass(model, tokenize(tokenizer, [prompt], config.model.max_length), config.model)


def test_batched_states_and_embeddings_equal_one_at_a_time_ones(trained_tiny, tiny_config, model):
    workdir, report = trained_tiny  # its train job computed the store with this pass
    splits = load_splits(workdir)
    samples = splits["train"]
    assert report["store"]["samples_computed"] == sum(map(len, splits.values()))
    # Prompts of different lengths share the pass's batches (max_length 256 cuts none of them).
    batch = by_token_count(samples, model[1], tiny_config).head(tiny_config.inference.batch_size)
    lengths = {len(model[1].encode(p)) for p in batch["prompt"]}
    assert len(lengths) > 1 and max(lengths) < tiny_config.model.max_length
    dtype = STATE_DTYPES[tiny_config.model.trunk_dtype]
    for sample_id, prompt, embedding in zip(batch["sample_id"], batch["prompt"], batch["embedding"]):
        expected = alone(*model, tiny_config, prompt)
        [states] = workdir.trunk.read([sample_id])
        torch.testing.assert_close(states.float(), expected.states[0], rtol=0, atol=STATE_ATOL)
        np.testing.assert_allclose(embedding, expected.embedding[0].numpy(), rtol=0, atol=EMBEDDING_ATOL)
        assert torch.equal(states, expected.states[0].to(dtype)) and np.array_equal(embedding, expected.embedding[0].numpy())


def test_without_a_trunk_store_the_embeddings_come_back_from_the_workers(ray_session, tiny_config, model, tmp_path):
    config = tiny_config.model_copy(update={"model": tiny_config.model.model_copy(update={"trunk_layers": 0}),
                                            "inference": tiny_config.inference.model_copy(update={"workers": 1})})  # faster to start
    workdir = Workdir(tmp_path)
    splits, store_pass = ray_prepare(config, workdir, model[1])
    assert store_pass.samples_computed == sum(map(len, splits.values())) and not workdir.trunk.root.exists()
    valid = load_splits(workdir)["valid"]
    for prompt, embedding in zip(valid["prompt"], valid["embedding"]):
        np.testing.assert_allclose(embedding, alone(*model, config, prompt).embedding[0].numpy(), rtol=0, atol=EMBEDDING_ATOL)


def test_an_interrupted_pass_computes_only_the_missing_states_on_the_actor_pool(trained_tiny, ray_session, tiny_config, model,
                                                                               tmp_path):
    source, _ = trained_tiny
    workdir = Workdir(tmp_path)
    before = load_splits(source)
    ids = [s for frame in before.values() for s in frame["sample_id"]]
    workdir.trunk.link_from(source.trunk, ids)  # what a pass killed after most of its batches left behind
    missing = ids[::17]
    workdir.trunk.remove(missing)
    _, store_pass = ray_prepare(tiny_config, workdir, model[1])
    assert store_pass.samples_computed == len(missing)
    assert store_pass.pids and os.getpid() not in store_pass.pids  # never in the driver
    assert len(store_pass.pids) <= store_pass.config.inference.workers  # the model loaded once per actor
    alive = {node["NodeID"] for node in ray_session.nodes() if node["Alive"]}
    assert store_pass.report()["nodes"] and set(store_pass.report()["nodes"]) <= alive
    assert all(workdir.trunk.path(s).read_bytes() == source.trunk.path(s).read_bytes() for s in ids)
    after = load_splits(workdir)
    for name, frame in before.items():
        assert after[name]["sample_id"].tolist() == frame["sample_id"].tolist()
        assert np.array_equal(np.stack(after[name]["embedding"]), np.stack(frame["embedding"]))


@pytest.mark.slow  # the path of a pool with GPUs (on CPUs the driver embeds the reference): make test-slow
def test_the_reference_embedded_on_the_pool_has_one_process_bits(ray_session, tiny_config, model):
    """Where the pool has GPUs, the jobs embed the partitioner's reference prompts on it (embed_pass)."""
    _, items = load_interactions_and_items(tiny_config.data)
    prompts = reference_prompts(items, 12, tiny_config.data.history_len, tiny_config.seed, tiny_config.data.prompt)
    config = tiny_config.model_copy(update={"inference": tiny_config.inference.model_copy(update={"batch_size": 4})})
    assert np.array_equal(embed_pass(config, prompts), embed(*model, prompts, tiny_config.model))  # in order, three batches


def test_the_pass_settings_are_no_part_of_the_training_fingerprint(tiny_config):
    from components.train import training_sha256

    other = tiny_config.model_copy(update={"inference": tiny_config.inference.model_copy(update={"batch_size": 7, "workers": 1})})
    assert training_sha256(other) == training_sha256(tiny_config)  # checkpoints and baselines stay valid


def test_the_training_report_says_where_the_store_was_computed(trained_tiny, ray_session):
    workdir, report = trained_tiny
    store = report["store"]
    assert store["samples_computed"] == sum(map(len, load_splits(workdir).values())) and store["seconds"] > 0
    assert set(store["nodes"]) <= {node["NodeID"] for node in ray_session.nodes() if node["Alive"]}
