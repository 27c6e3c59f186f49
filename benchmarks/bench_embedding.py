"""Which layer APA's neighbour embedding should come from: test AUC per depth, shards held fixed.

    python -m benchmarks.bench_embedding [--config configs/movielens.yaml] [--workdir runs/bench/<experiment>]

APA's attention embeds each request (the mean-pooled states after a layer of the frozen trunk)
and looks up its neighbours in the validation set. On the trunk path any layer at or below the
boundary comes out of the trunk pass that serving runs anyway, so a depth costs no serving time:
only the AUC tells depths apart. Here, on a trained work dir (default: the evaluation's, trained
by `python -m benchmarks`), the live shard adapters and their cached validation predictions stay
as they are; the embeddings of the validation keys and of the test queries are recomputed at
each depth (one prompt at a time, one pass per prompt up to the deepest), and the test samples
are scored by the head over their stored trunk states: the APA (non-decomposed) test AUC per
depth against the depth the work dir was trained with (the baseline). The shards themselves were
partitioned with that depth; a different depth would also move shard boundaries, which this
benchmark does not retrain. The baseline's recomputed keys must equal the stored ones bit for bit
(the check that this scores what serving scores). The recomputation is one trunk pass per
validation and test sample: about 5 minutes for configs/movielens.yaml's 1500 on 2 cores.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import bench_dir, equal_but_rounding, figure, finish, offline, parser
from components.aggregate import AggregatorState, load_mixture, predict, stored_inputs
from components.config import load_config
from components.metrics import auc, auc_interval
from components.model import decoder_of, load_base_model, load_tokenizer, make_deterministic, mean_pool, run_layers, tokenize
from components.store import Workdir, load_splits

NAME = "bench_embedding"
DEPTHS = "4,8,16,26"
BATCH = 16


@torch.no_grad()
def embeddings_at(model, tokenizer, prompts: list[str], max_length: int, depths: list[int]) -> dict[int, torch.Tensor]:
    """The mean-pooled states after each of `depths` layers, one prompt at a time, all from one
    pass per prompt (the same operations as components.model.trunk_pass's embedding)."""
    decoder = decoder_of(model)
    rows: dict[int, list[torch.Tensor]] = {d: [] for d in depths}
    for prompt in prompts:
        batch = tokenize(tokenizer, [prompt], max_length)
        mask = batch["attention_mask"]
        hidden = decoder.embed_tokens(batch["input_ids"])
        for depth, states in enumerate(run_layers(decoder, hidden, mask, decoder.layers[: max(depths)]), 1):
            if depth in rows:
                rows[depth].append(mean_pool(states, mask).cpu())
    return {d: torch.cat(r) for d, r in rows.items()}


def main(argv: list[str] | None = None) -> int:
    p = parser(NAME, __doc__.splitlines()[0], prepares=False)
    p.add_argument("--depths", default=DEPTHS, help=f"embedding depths to compare, at most the trunk's (default {DEPTHS})")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    offline()
    from ray_jobs.evaluation.scoring import LiveSet  # the live adapter set, as the evaluation loads it

    started = time.time()
    config = load_config(args.config)
    workdir = Workdir(args.workdir or bench_dir() / config.experiment)
    if not workdir.split("test").exists():
        p.error(f"{workdir.root} holds no trained work dir: run `python -m benchmarks --only eval` first, or pass --workdir")
    trunk, trained = config.model.trunk_layers, config.model.embedding_depth
    if not trunk:
        p.error("this benchmark compares layers of the frozen trunk: the config has model.trunk_layers 0")
    depths = sorted({d for d in map(int, args.depths.split(",")) if 0 < d <= trunk} | {trained})
    make_deterministic(args.threads)
    splits = load_splits(workdir)
    valid, test = splits["valid"].set_index("sample_id"), splits["test"]
    labels = test["label"].to_numpy().astype(int)
    test_states = workdir.trunk.read(test["sample_id"])
    with LiveSet(config, workdir) as live:
        tokenizer = load_tokenizer(config.model)
        mixture = load_mixture(config, live.files, tokenizer, load_base_model(config.model, config.seed, tokenizer))
        t0 = time.time()
        keys = embeddings_at(mixture.model, tokenizer, valid.loc[live.state.sample_ids, "prompt"].tolist(),
                             config.model.max_length, depths)
        queries = embeddings_at(mixture.model, tokenizer, test["prompt"].tolist(), config.model.max_length, depths)
        print(f"embeddings of {len(live.state.sample_ids)} validation keys and {len(test)} test queries at depths "
              f"{depths} in {time.time() - t0:.0f}s", flush=True)
        if not equal_but_rounding(keys[trained], live.state.embeddings):
            raise SystemExit(f"recomputed validation keys at depth {trained} differ from the stored ones: "
                             "the work dir was not trained with this config")
        rows = {}
        for depth in depths:
            state = AggregatorState(live.state.sample_ids, live.state.labels, keys[depth], live.state.predictions)
            batches = (stored_inputs(test_states[i:i + BATCH], queries[depth][i:i + BATCH]) for i in range(0, len(test), BATCH))
            scores = predict(config, mixture, batches, state, live.partitioner, live.masked, "attention").p_yes
            rows[depth] = {"auc": auc(labels, scores), "interval": auc_interval(labels, scores, seed=0)}
            low, high = rows[depth]["interval"] or (float("nan"), float("nan"))
            print(f"  depth {depth:>3}: APA AUC {rows[depth]['auc']:.4f} [{low:.3f}, {high:.3f}]", flush=True)
    label = lambda d: f"embedding after layer {d}"  # noqa: E731
    figures = [figure(f"APA AUC, {label(d)}", rows[d]["auc"], "", f"{label(trained)} (trained)", rows[trained]["auc"])
               for d in depths]
    finish(NAME, {"seconds": time.time() - started, "workdir": str(workdir.root), "n_test": len(test),
                  "n_valid_keys": len(live.state.sample_ids), "trained_depth": trained, "rows": rows, "figures": figures})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
