"""Issue 28, item 1: the evaluation's scoring is a Ray Data job; its scores are those of `predict`
run in one process on the same stored states, cut into the same batches, for every method the job
scores at once."""

import shutil

import numpy as np
import pytest

from components.aggregate import load_mixture, predict, stored_inputs
from components.model import load_base_model, load_tokenizer, make_deterministic
from components.store import load_splits, sample_states
from ray_jobs import evaluate as evaluate_job
from ray_jobs.passes import Scoring, score_pass

THREADS = 1  # the workers' torch threads, and this process's: the bits may depend on it


def in_process(config, workdir, live, test, method, step, files):
    """The evaluation's old in-driver path: `predict` batch by batch over the stored states."""
    make_deterministic(THREADS)
    tokenizer = load_tokenizer(config.model)
    base = load_base_model(config.model, config.seed, tokenizer, head_only=True)
    mixture = load_mixture(config, files, tokenizer, base)
    states, embeddings = sample_states(config, workdir, test, base, tokenizer), test["embedding"].tolist()
    batches = [stored_inputs(states[i : i + step], embeddings[i : i + step]) for i in range(0, len(test), step)]
    return predict(config, mixture, batches, live.state, live.partitioner, live.masked, method)[0]


# make test keeps the evaluation's own check of this path (test_evaluate: APA's Ray Data scores equal
# predict's, bit for bit); this one adds two mixtures per actor and the per-batch timing.
@pytest.mark.slow
def test_the_ray_data_scores_are_the_in_process_ones_bit_for_bit(trained_tiny, tiny_config):
    workdir, _ = trained_tiny
    test = load_splits(workdir)["test"]
    step = 8  # 32 test samples: 4 batches over the 2 workers, returned in any order
    with evaluate_job.LiveSet(tiny_config, workdir) as live:
        # The download lies inside the work dir (every node sees it), and goes afterwards.
        assert live.aggregator.is_relative_to(workdir.path("reports"))
        # Two methods in one job: each actor holds both mixtures, over one copy of the base's weights.
        scorings = [Scoring("apa", tiny_config, live.files, live.aggregator, "attention", frozenset(live.masked)),
                    Scoring("shard-1", tiny_config, {1: live.files[1]}, live.aggregator, "uniform")]
        expected = {"apa": in_process(tiny_config, workdir, live, test, "attention", step, live.files),
                    "shard-1": in_process(tiny_config, workdir, live, test, "uniform", step, {1: live.files[1]})}
        out = score_pass(tiny_config, workdir, test, scorings, THREADS, step)
    assert not list(workdir.path("reports").glob(".live-set-*"))
    assert out["name"].tolist() == ["apa"] * len(test) + ["shard-1"] * len(test)
    assert not np.array_equal(expected["apa"], expected["shard-1"])
    for name, scores in expected.items():
        mine = out[out["name"] == name]
        assert mine["sample_id"].tolist() == test["sample_id"].tolist()  # back in test order
        assert mine["batch"].tolist() == [i // step for i in range(len(test))]
        # Same samples per batch, same padding, same thread count: the same bits (within 1e-6 is the
        # tolerance a different batch cut would need; here it is equality).
        np.testing.assert_allclose(mine["score"].to_numpy(), scores, rtol=0, atol=1e-6)
        assert np.array_equal(mine["score"].to_numpy(), scores), name
        # Each batch timed inside its worker, after the worker's warm-up batch.
        per_batch = mine.groupby("batch")["seconds_per_sample"].nunique()
        assert (per_batch == 1).all() and (mine["seconds_per_sample"] > 0).all()


@pytest.mark.slow  # make recipe's path (tuning tau), not the product's
def test_leave_one_out_weighs_each_validation_sample_by_the_others_only(trained_tiny, tiny_config, tmp_path):
    """make recipe's choice of tau: a validation sample scored leave-one-out gets the score the plain
    path gives it under the aggregator state without that sample."""
    workdir, _ = trained_tiny
    with evaluate_job.LiveSet(tiny_config, workdir) as live:
        valid = load_splits(workdir)["valid"].set_index("sample_id").loc[live.state.sample_ids].reset_index()
        scorings = [Scoring("loo", tiny_config, live.files, live.aggregator, "attention", leave_one_out=True),
                    Scoring("plain", tiny_config, live.files, live.aggregator, "attention")]
        left_out = [0, len(valid) - 1]
        for row in left_out:  # the plain path over a state that never held the sample
            folder = shutil.copytree(live.aggregator, tmp_path / f"without-{row}")
            live.state.without({valid["sample_id"][row]}).save(folder)
            scorings.append(Scoring(f"without-{row}", tiny_config, live.files, folder, "attention"))
        out = score_pass(tiny_config, workdir, valid, scorings, THREADS, 8)
    score = {name: out.loc[out["name"] == name, "score"].to_numpy() for name in out["name"].unique()}
    for row in left_out:
        np.testing.assert_allclose(score["loo"][row], score[f"without-{row}"][row], rtol=0, atol=1e-6)
    assert not np.array_equal(score["loo"], score["plain"]), "each sample's own label still weighs it"
