"""The comparison's baselines as configurations derived from the main one.

Each baseline trains through the same machinery as APA, in its own work dir
(`DIR/baselines/<name>`) under its own experiment (`<experiment>-<name>`):

    retrain    one adapter on all the training data, one slice   (forgetting = retraining from scratch)
    sisa       K random shards, average of the K models' P(yes)
    user       K user-based shards, average of the K models' P(yes)
    lmeraser   adaptive clusters, one soft prompt each, routing to the nearest prototype
    forget-cost  a copy of APA itself, where the evaluation may forget a user to time it
"""

from __future__ import annotations

import hashlib
import json

from components.config import Config
from components.train import training_sha256

BASELINES = ("retrain", "sisa", "user", "lmeraser")
BASELINE_AGGREGATE = {"retrain": "uniform", "sisa": "average", "user": "average", "lmeraser": "routing"}
BASELINE_PARTITION = {"retrain": "random", "sisa": "random", "user": "user", "lmeraser": "adaptive"}


def baseline_config(config: Config, name: str) -> Config:
    """The derived config of a baseline (or of the forget-cost copy of APA), with its own experiment."""
    if name == "forget-cost":
        return config.model_copy(update={"experiment": f"{config.experiment}-forget-cost"})
    if name not in BASELINE_AGGREGATE:
        raise ValueError(f"unknown baseline {name!r}: choose from {', '.join(BASELINES)} or forget-cost")
    update = {
        "experiment": f"{config.experiment}-{name}",
        "partition": config.partition.model_copy(update={"method": BASELINE_PARTITION[name]}),
        "aggregate": config.aggregate.model_copy(update={"method": BASELINE_AGGREGATE[name]}),
    }
    if name == "retrain":
        # Slices only make forgetting cheaper, and a retrain forgets from scratch anyway; in
        # incremental mode they would also cost it accuracy (the last slice's epochs come last).
        update["partition"] = update["partition"].model_copy(update={"num_shards": 1, "num_slices": 1})
        if config.train.retrain_cpus is not None:
            update["train"] = config.train.model_copy(update={"cpus_per_actor": config.train.retrain_cpus})
    if name == "lmeraser":
        update["adapter"] = config.adapter.model_copy(update={"kind": "prompt"})
    return config.model_copy(update=update)


def baseline_sha256(config: Config) -> str:
    """What a baseline's adapters depend on: how a shard is trained (components.train), the data
    and the partition; not serving, aggregation or resources, so a change there keeps the baselines."""
    relevant = {"training": training_sha256(config), **config.model_dump(mode="json", include={"data", "partition"})}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()
