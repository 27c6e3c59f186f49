"""How deep the APA query embedding must be: test AUC and embedding cost per depth, shards held fixed.

    python -m benchmarks.bench_embedding [--config configs/movielens.yaml] [--workdir runs/bench/movielens]

APA's attention embeds each request with the frozen model and looks up its neighbours in the
validation set. A full-depth embedding is a second forward pass per request; the first few layers
cost a fraction of one (bench_serving measures the latency). Here, on a trained work dir (default:
the evaluation's, trained by `python -m benchmarks`), the live shard adapters and their cached
validation predictions stay as they are and only the embedding of the validation keys and of the
test queries changes: for each depth, the APA (non-decomposed) test AUC and the seconds per
embedding at batch 1, against the depth the work dir was trained with (the baseline). The shards
themselves were partitioned with that depth; a different depth would also move shard boundaries,
which this benchmark does not retrain. The baseline's recomputed keys must equal the stored ones
bit for bit (the check that this scores what serving scores).
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import bench_dir, figure, finish, offline, parser
from components.aggregate import AggregatorState, load_mixture, predict
from components.config import load_config
from components.metrics import auc
from components.model import embed, load_base_model, load_tokenizer, make_deterministic
from components.store import Workdir, load_splits

NAME = "bench_embedding"
DEPTHS = (2, 4, 8, None)  # None: every layer


def main(argv: list[str] | None = None) -> int:
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    offline()
    from ray_jobs.evaluate import LiveSet  # the live adapter set, as the evaluation loads it

    started = time.time()
    config = load_config(args.config)
    workdir = Workdir(args.workdir or bench_dir() / "movielens")
    if not workdir.split("test").exists():
        p.error(f"{workdir.root} holds no trained work dir: run `python -m benchmarks --only eval` first, or pass --workdir")
    make_deterministic(args.threads)
    splits = load_splits(workdir)
    valid, test = splits["valid"].set_index("sample_id"), splits["test"]
    queries, labels = test["prompt"].tolist(), test["label"].to_numpy().astype(int)
    trained_depth = config.model.embedding_layers
    depths = sorted({*DEPTHS, trained_depth}, key=lambda d: d or 10**6)
    rows = {}
    with LiveSet(config, workdir) as live:
        tokenizer = load_tokenizer()
        mixture = load_mixture(config, live.files, tokenizer, load_base_model(config.model, config.seed, tokenizer))
        keys_prompts = valid.loc[live.state.sample_ids, "prompt"].tolist()
        for depth in depths:
            depth_config = config.model_copy(update={"model": config.model.model_copy(update={"embedding_layers": depth})})
            t0 = time.perf_counter()
            keys = torch.from_numpy(embed(mixture.model, tokenizer, keys_prompts, config.model.max_length, depth))
            per_embedding = (time.perf_counter() - t0) / max(1, len(keys_prompts))
            if depth == trained_depth and not torch.equal(keys, live.state.embeddings.float()):
                raise SystemExit(f"recomputed validation keys at depth {depth} differ from the stored ones: "
                                 "the work dir was not trained with this config")
            state = AggregatorState(live.state.sample_ids, live.state.labels, keys, live.state.predictions)
            scores, _ = predict(depth_config, mixture, queries, state, live.partitioner, live.masked, "attention")
            rows[depth] = {"auc": auc(labels, scores), "seconds_per_embedding": per_embedding}
            print(f"  depth {depth or 'all':>3}: APA AUC {rows[depth]['auc']:.4f}, "
                  f"{per_embedding * 1000:.1f} ms per embedding at batch 1", flush=True)
    base = rows[trained_depth]
    label = lambda d: f"first {d} layers" if d else "all layers"  # noqa: E731
    figures = []
    for depth in depths:
        figures.append(figure(f"APA AUC, embedding of {label(depth)}", rows[depth]["auc"], "",
                              f"{label(trained_depth)} (trained)", base["auc"]))
    for depth in depths:
        figures.append(figure(f"embedding time, {label(depth)}", rows[depth]["seconds_per_embedding"] * 1000, "ms",
                              f"{label(trained_depth)} (trained)", base["seconds_per_embedding"] * 1000,
                              higher_is_better=False))
    finish(NAME, {"seconds": time.time() - started, "workdir": str(workdir.root), "n_test": len(test),
                  "n_valid_keys": len(keys_prompts), "trained_depth": trained_depth, "figures": figures})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
