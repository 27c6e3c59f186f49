"""The library of exact unlearning for LLM recommenders: pure Python, torch, peft and pandas, with
MLflow behind `Registry` alone; no Ray (the jobs in ray_jobs/ and the server in serving/ wire these
onto a cluster). Score a trained work dir's test samples with its live adapter set, then ask to
forget a user:

    from pathlib import Path
    import components as ul

    config = ul.load_config("configs/tiny.yaml")
    workdir = ul.Workdir("runs/tiny")                      # trained by `unlearn train`
    live = ul.Registry(config.experiment, workdir.root).load_adapter_set(Path("/tmp/live"))
    files = {k: Path(v["local"]) / ul.ADAPTER_FILE for k, v in live.shards.items()}
    mixture = ul.load_mixture(config, files, ul.load_tokenizer(config.model))
    test = ul.load_splits(workdir)["test"][:8]
    inputs = ul.stored_inputs(ul.sample_states(config, workdir, test), test["embedding"])
    state = ul.AggregatorState.load(live.folder / "aggregator")
    scores, weights, dropped = ul.predict(config, mixture, [inputs], state, None)  # APA: ul.apa_weights, one forward
    ul.new_request(workdir, ["13"], [])                    # recorded; `unlearn forget` carries it out

Names load on first use: importing one module of the package stays as light as that module.
"""

from importlib import import_module

_WHERE = {
    "Config": "config", "ConfigError": "config", "load_config": "config",
    "load_interactions_and_items": "data", "build_samples": "data", "split_by_time": "data",
    "Workdir": "store", "load_splits": "store", "sample_states": "store", "prepare": "store",
    "load_tokenizer": "model", "load_base_model": "model",
    "Partitioner": "partition",
    "train_shard": "train", "ShardResult": "train", "ADAPTER_FILE": "train",
    "AggregatorState": "aggregate", "Aggregation": "aggregate", "AGGREGATIONS": "aggregate",
    "aggregation": "aggregate", "apa_weights": "aggregate", "load_mixture": "aggregate",
    "stored_inputs": "aggregate", "predict": "aggregate",
    "Registry": "registry",
    "new_request": "unlearn", "RequestError": "unlearn",
    "auc": "metrics",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'components' has no attribute {name!r}")
    return getattr(import_module(f"components.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
