"""Choose the training recipe on the validation split, never on the test split.

    python -m benchmarks.recipe [--config configs/movielens.yaml] [--n-train 1024] [--epochs 3] [--slices 4]
    make recipe

Each candidate recipe (loss, learning rate, LoRA rank and targets, or a soft prompt) trains one
adapter, as a shard actor would, on the same seeded subset of `--n-train` training samples of the work dir's store
(default: the size of one of the config's shards), over the stored trunk states, and scores the
whole validation split after every epoch (of the last slice, with `--slices R`: the subset split
into R slices by user and trained stage by stage in the config's slice_mode, as a shard's adapter
is; the default, 1, trains the subset at once). Candidates run as Ray tasks, one CPU each. The table
shows validation AUC with its 95% bootstrap interval per epoch; the best LoRA row is the recipe to
put in the config, the best prompt row its `train.prompt_learning_rate`. The test split is never read.

    python -m benchmarks.recipe --tau 1,10,30,100,300,1000 --trained runs/bench/movielens

chooses APA's temperature the same way, on a trained work dir: each validation sample is weighed
by its `aggregate.neighbours` nearest *other* validation samples (leave-one-out, so its own label
never weighs it) with components.aggregate.apa_weights, scored by the mixture of the live
adapters (the decomposed merge when the config's `aggregate.method` is `decomposed`) in one Ray Data
scoring job on the cluster (every tau on the same actors), and the validation AUC is shown per tau.
Aggregation does not touch training: a new tau needs no retraining.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import NamedTuple

import ray

from benchmarks.common import MOVIELENS, bench_dir, offline, shared_store
from components.checkpoints import SliceCheckpoints
from components.config import Config, load_config
from components.data import read_parquet, stable_hash
from components.metrics import auc, auc_interval
from components.store import Workdir, sample_states


class Recipe(NamedTuple):
    loss: str
    learning_rate: float
    rank: int
    targets: tuple[str, ...]
    head_dtype: str = "float32"
    adapter: str = "lora"  # or "prompt": LMEraser's soft prompt (rank and targets unused)


QV, QKVO = ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")
# TALLRec's recipe and the two-way loss at two learning rates, then more capacity in attention;
# then the best of those with the head in bfloat16 (twice as fast on this CPU), and in bfloat16 a
# higher rate and LoRA in the MLP too; then a lower rate, for the many more steps of 4096 samples;
# then LMEraser's soft prompt (train.prompt_learning_rate), from LoRA's rate up (prompt tuning is
# usually run at 1e-2 and more), for `--n-train` the size of one of its clusters.
CANDIDATES = (
    Recipe("vocabulary", 3e-4, 8, QV),
    Recipe("vocabulary", 1e-3, 8, QV),
    Recipe("two-way", 3e-4, 8, QV),
    Recipe("two-way", 1e-3, 8, QV),
    Recipe("two-way", 1e-3, 16, QKVO),
    Recipe("two-way", 1e-3, 8, QV, "bfloat16"),
    Recipe("two-way", 2e-3, 8, QV, "bfloat16"),
    Recipe("two-way", 1e-3, 8, (*QV, "gate_proj", "up_proj", "down_proj"), "bfloat16"),
    Recipe("two-way", 5e-4, 8, QV, "bfloat16"),
    *(Recipe("two-way", rate, 0, (), "bfloat16", "prompt") for rate in (1e-3, 1e-2, 3e-2, 1e-1, 3e-1)),
)


def recipe_config(config: Config, recipe: Recipe, epochs: int, slices: int = 1) -> Config:
    return config.model_copy(update={
        "model": config.model.model_copy(update={"head_dtype": recipe.head_dtype}),
        "partition": config.partition.model_copy(update={"num_slices": slices}),
        "adapter": config.adapter.model_copy(update={"kind": "prompt"} if recipe.adapter == "prompt" else
                                             {"kind": "lora", "r": recipe.rank, "alpha": 2 * recipe.rank,
                                              "target_modules": recipe.targets}),
        "train": config.train.model_copy(update={"loss": recipe.loss, "learning_rate": recipe.learning_rate,
                                                 "prompt_learning_rate": None, "epochs": epochs}),
    })


def adapter_text(config: Config) -> str:
    if config.adapter.kind == "prompt":
        return f"soft prompt, {config.adapter.num_virtual_tokens} tokens"
    return f"LoRA r {config.adapter.r} {'+'.join(config.adapter.target_modules or ('family default',))}"


@ray.remote(num_cpus=1)
def try_recipe(config_json: dict, store: str, train_ids: list[str]) -> list[dict]:
    """Train one adapter with the recipe in `config_json`, its samples in the config's slices as
    a shard's are; validation AUC after every epoch of the last slice (the adapter a shard serves)."""
    from components.model import answer_token_ids, load_base_model, load_tokenizer, make_deterministic
    from components.partition import slice_of
    from components.train import predict_states, train_shard

    config = Config.model_validate(config_json)
    make_deterministic(1)
    workdir = Workdir(store)
    tokenizer = load_tokenizer(config.model)
    base = load_base_model(config.model, config.seed, tokenizer, head_only=True)
    train = read_parquet(workdir.split("train")).set_index("sample_id").loc[train_ids].reset_index()
    train["slice"] = slice_of(train["user_id"], config.partition.num_slices, config.seed)
    valid = read_parquet(workdir.split("valid"))
    labels = valid["label"].to_numpy()
    valid_states = sample_states(config, workdir, valid, base, tokenizer)
    yes_id, no_id = answer_token_ids(tokenizer, config.model)
    rows, started = [], time.time()

    def after_epoch(model, stage, epoch):
        if stage < config.partition.num_slices - 1:
            return
        scores = predict_states(model, valid_states, yes_id, no_id)
        rows.append({"epoch": epoch + 1, "valid_auc": auc(labels, scores), "interval": auc_interval(labels, scores, seed=0),
                     "seconds": round(time.time() - started, 1)})
        print(f"  {config.train.loss} lr {config.train.learning_rate:g} {adapter_text(config)} "
              f"{config.model.head_dtype}: epoch {epoch + 1} "
              f"valid AUC {rows[-1]['valid_auc']:.4f}", flush=True)

    with tempfile.TemporaryDirectory() as checkpoints:
        train_shard(config, 0, train, valid, SliceCheckpoints(checkpoints), base, tokenizer,
                    lambda frame: sample_states(config, workdir, frame, base, tokenizer), after_epoch=after_epoch)
    return rows


def tau_rows(config: Config, workdir: Workdir, taus: list[float]) -> list[dict]:
    """Leave-one-out validation AUC of APA's attention for each tau, on `workdir`'s live adapters,
    merged as `config.aggregate.method` says (decomposed, or else non-decomposed): one Ray Data
    scoring job over the validation samples (ray_jobs.passes.score_pass), a scoring per tau."""
    from ray_jobs.common import connect_ray
    from ray_jobs.evaluation.scoring import LiveSet  # the live adapter set, as the evaluation loads it
    from ray_jobs.passes import Scoring, score_pass

    connect_ray(config, workdir)
    with LiveSet(config, workdir) as live:
        valid = read_parquet(workdir.split("valid")).set_index("sample_id").loc[live.state.sample_ids].reset_index()
        scorings = [Scoring(f"tau {tau:g}", with_tau(config, tau), live.files, live.aggregator, config.aggregate.method,
                            frozenset(live.masked), leave_one_out=True) for tau in taus]
        scored = score_pass(config, workdir, valid, scorings, max(1, int(config.inference.cpus_per_worker)), 16)
    labels, rows = valid["label"].to_numpy(), []
    for tau, scoring in zip(taus, scorings):
        scores = scored.loc[scored["name"] == scoring.name, "score"].to_numpy()
        rows.append({"tau": tau, "valid_auc": auc(labels, scores), "interval": auc_interval(labels, scores, seed=0)})
        print(f"  tau {tau:g}: leave-one-out validation AUC {rows[-1]['valid_auc']:.4f}", flush=True)
    return rows


def with_tau(config: Config, tau: float) -> Config:
    return config.model_copy(update={"aggregate": config.aggregate.model_copy(update={"tau": tau})})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipe", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(MOVIELENS))
    parser.add_argument("--workdir", help="a work dir whose sample store to use (default: the shared store "
                        "runs/store/<experiment>, prepared if missing)")
    parser.add_argument("--n-train", type=int, help="training samples per candidate (default: one shard's share)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs at each slice")
    parser.add_argument("--slices", type=int, default=1, help="slices of the subset, trained in the config's "
                        "slice_mode as a shard is (default 1: the subset at once)")
    parser.add_argument("--candidates", help=f"comma-separated numbers (1-{len(CANDIDATES)}) of the candidates to "
                        "train, in the order of CANDIDATES (default: all)")
    parser.add_argument("--tau", help="comma-separated APA temperatures to compare instead (needs --trained)")
    parser.add_argument("--trained", help="a trained work dir of --config whose live adapters --tau weighs")
    args = parser.parse_args(argv)
    offline()
    config = load_config(args.config)
    if args.tau:
        if not args.trained or not Workdir(args.trained).split("valid").exists():
            parser.error("--tau needs --trained DIR, a work dir trained with --config")
        try:
            taus = [float(t) for t in args.tau.split(",")]
        except ValueError:
            parser.error(f"--tau takes comma-separated numbers, got {args.tau!r}")
        rows = tau_rows(config, Workdir(args.trained), taus)
        best = max(rows, key=lambda r: r["valid_auc"])
        for row in rows:
            low, high = row["interval"] or (float("nan"), float("nan"))
            print(f"tau {row['tau']:>7g}  valid AUC {row['valid_auc']:.4f}  [{low:.3f}, {high:.3f}]{'  <- best' if row is best else ''}")
        return 0
    numbers = args.candidates.split(",") if args.candidates else [str(n) for n in range(1, len(CANDIDATES) + 1)]
    if not all(n.strip().isdigit() and 1 <= int(n) <= len(CANDIDATES) for n in numbers):
        parser.error(f"--candidates takes numbers from 1 to {len(CANDIDATES)}, got {args.candidates!r}")
    candidates = [CANDIDATES[int(n) - 1] for n in numbers]
    if args.slices < 1:
        parser.error(f"--slices takes a positive number, got {args.slices}")
    workdir = Workdir(args.workdir) if args.workdir else shared_store(config)
    if not workdir.split("valid").exists():
        parser.error(f"{workdir.root} holds no prepared sample store (no {workdir.split('valid').name})")
    train = read_parquet(workdir.split("train"))
    n_train = min(len(train), args.n_train or len(train) // config.partition.num_shards)
    chosen = sorted(train["sample_id"], key=lambda s: stable_hash("recipe", config.seed, s))[:n_train]
    print(f"recipe search: {len(candidates)} candidates x {args.epochs} epochs on {n_train} training samples "
          f"({args.slices} slice(s), {config.train.slice_mode if args.slices > 1 else 'at once'}), "
          f"scored on {len(read_parquet(workdir.split('valid')))} validation samples ({workdir.root})", flush=True)

    started = time.time()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        configs = [recipe_config(config, candidate, args.epochs, args.slices) for candidate in candidates]
        results = ray.get([try_recipe.remote(c.model_dump(mode="json"), str(workdir.root), chosen) for c in configs])
    finally:
        ray.shutdown()

    table = []
    for candidate, candidate_config, rows in zip(candidates, configs, results):
        for row in rows:
            table.append({**candidate._asdict(), "targets": list(candidate.targets), "adapter_text": adapter_text(candidate_config), **row})
    best = {kind: max((r for r in table if r["adapter"] == kind), key=lambda r: r["valid_auc"])
            for kind in {r["adapter"] for r in table}}  # a recipe for LoRA, another for prompts
    print(f"\n{'loss':<11} {'lr':>7} {'adapter':<50} {'head':<8} {'epoch':>5} {'valid AUC':>9}  95% interval")
    for row in table:
        low, high = row["interval"] or (float("nan"), float("nan"))
        mark = "  <- best" if row is best[row["adapter"]] else ""
        print(f"{row['loss']:<11} {row['learning_rate']:>7g} {row['adapter_text']:<50} "
              f"{row['head_dtype']:<8} {row['epoch']:>5} {row['valid_auc']:>9.4f}  [{low:.3f}, {high:.3f}]{mark}")
    out = bench_dir() / "results" / "recipe.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "n_train": n_train, "slices": args.slices,
                               "slice_mode": config.train.slice_mode, "n_valid": len(read_parquet(workdir.split("valid"))),
                               "rows": table, "best": best, "seconds": round(time.time() - started, 1)}, indent=1))
    print(f"\n{out} ({time.time() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
