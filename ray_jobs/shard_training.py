"""Shard training on Ray Train: one TorchTrainer per shard, the K trainers running at once.

    DIR/shards/shard-<k>/                 the shard's Ray Train run (storage_path DIR/shards, name shard-<k>)
    DIR/shards/shard-<k>/checkpoints/slice-<r>/checkpoint.pt   its slice checkpoints, Ray Train checkpoints

or, where train.storage names a URI (s3://, file://...), the runs under the work dir's own folder
there (Workdir.shard_runs); the shard's samples, adapter and progress stay in the work dir.

Each trainer's workers (train.workers_per_shard, train.cpus_per_actor / gpus_per_actor each) run
`components.train.train_shard`; every slice checkpoint is reported to Ray Train, which copies it
into the run's storage, and a failed worker group is restarted by Ray Train (FailureConfig) and
resumes from the last clean slice checkpoint with nobody calling anything. Which checkpoint is
clean is decided by its manifest (components.train.last_clean_stage), never by Ray's record of the
run. Results come back through a small actor on the driver's node, not through Ray's metrics,
which Ray keeps on disk: validation predictions are user data that a forget must be able to drop.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import ray
import ray.train
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from components.checkpoints import CHECKPOINT_FILE, delete
from components.config import ALLOCATOR_ENV, Config
from components.data import read_parquet
from components.model import load_base_model, load_tokenizer, make_deterministic
from components.progress import progress
from components.store import Workdir, sample_states
from components.train import gathered, save_atomic, save_shard_result, shard_steps, train_shard

# Ray Train's own record of a run's checkpoints; it would bring back checkpoints a forget purged.
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"


@ray.remote(num_cpus=0)
class ShardResults:
    """Where each shard's rank 0 leaves its result for the driver (kept in memory only)."""

    def __init__(self):
        self.results: dict[int, dict] = {}

    def put(self, shard: int, result: dict) -> None:
        self.results[shard] = result

    def take(self, shard: int) -> dict | None:
        return self.results.pop(shard, None)


def train_loop(loop_config: dict) -> None:
    """One Ray Train worker of one shard."""
    config, workdir, shard = Config.model_validate(loop_config["config"]), Workdir(loop_config["workdir"]), loop_config["shard"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    started_at = time.time()
    # The thread count is part of the result's bits: it comes from the config, never the host.
    make_deterministic(max(1, int(config.train.cpus_per_actor)))
    tokenizer = load_tokenizer(config.model)
    samples = read_parquet(workdir.shard_samples(shard))
    valid = read_parquet(workdir.split("valid"))
    # Only the head runs here: its layers over the samples' stored trunk states.
    base = load_base_model(config.model, config.seed, tokenizer, head_only=True)

    where = {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def progress(event: dict) -> None:
        if rank == 0:
            with workdir.progress(shard).open("a") as f:
                f.write(json.dumps({**event, **where}) + "\n")

    def save_checkpoint(state: dict | None, stage: int) -> None:
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if state is not None:
                save_atomic(state, Path(folder) / CHECKPOINT_FILE)
                checkpoint = Checkpoint.from_directory(folder)
            ray.train.report({"slice": stage, "step": len(state["losses"]) if state else 0}, checkpoint=checkpoint,
                             checkpoint_dir_name=f"checkpoints/slice-{stage}")

    result = train_shard(config, shard, samples, valid, workdir.checkpoints(shard), base, tokenizer,
                         lambda rows: sample_states(config, workdir, rows, base, tokenizer),
                         progress=progress, save_checkpoint=save_checkpoint, rank=rank, world_size=world_size)
    nodes = gathered(ray.get_runtime_context().get_node_id(), world_size)
    if rank == 0:
        save_shard_result(result, workdir.adapter(shard), config)
        ray.get(loop_config["results"].put.remote(shard, {
            "shard": shard, "valid_predictions": result.valid_predictions, "samples": result.samples,
            "manifest_sha256": result.manifest_sha256, "adapter_sha256": result.adapter_sha256,
            "restarted_from": result.restarted_from, "losses": result.losses, "seconds": result.seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "started_at": started_at, "finished_at": time.time(), "workers": world_size, "nodes": sorted(set(nodes)),
        }))


def shard_trainer(config: Config, workdir: Workdir, shard: int, results) -> TorchTrainer:
    resources = {"CPU": config.train.cpus_per_actor}
    if config.train.gpus_per_actor:
        resources["GPU"] = config.train.gpus_per_actor
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "workdir": str(workdir.root), "shard": shard,
                           "results": results},
        scaling_config=ScalingConfig(num_workers=config.train.workers_per_shard, resources_per_worker=resources,
                                     use_gpu=bool(config.train.gpus_per_actor)),
        run_config=RunConfig(
            name=f"shard-{shard}", storage_path=workdir.shard_runs(),
            failure_config=FailureConfig(max_failures=config.train.max_restarts),
            worker_runtime_env={"env_vars": ALLOCATOR_ENV},
        ),
    )


def fit(config: Config, workdir: Workdir, shard: int, results) -> None:
    """Run a shard's trainer. Ray Train restarts a failed worker group itself (FailureConfig); a
    worker that dies while the controller is talking to it (e.g. mid-report) fails the run with a
    ControllerError that Ray does not retry: start the run again, it resumes from the last clean
    slice checkpoint all the same."""
    for attempt in range(config.train.max_restarts + 1):
        delete(f"{workdir.shard_runs()}/shard-{shard}/{RAY_TRAIN_SNAPSHOT}")
        try:
            shard_trainer(config, workdir, shard, results).fit()
            return
        except ray.train.ControllerError as err:
            if attempt == config.train.max_restarts:
                raise
            reason = " ".join(str(err).split())[:300]
            print(f"  shard {shard}: its Ray Train run failed ({reason}); starting it again", flush=True)


def train_shards(config: Config, workdir: Workdir, shards: list[int]) -> dict[int, dict]:
    """Train `shards` at once (at most train.max_concurrent_shards runs at a time), one Ray Train run
    each; a failed shard restarts from its last slice checkpoint (up to train.max_restarts times).
    Returns each shard's result. The driver shows the shards' steps as one progress bar, read from
    the progress files their rank 0 writes."""
    # Starting K worker groups at once on a busy node can take minutes; Ray Train's default of 60 s
    # would fail the run. The controller reads this from the driver's environment.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "900")
    # A worker's report waits in a queue of one until the controller's next poll (2 s by default):
    # a forget's few small slices would spend seconds waiting there.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    workdir.bind_storage(config.train.storage)
    results = ShardResults.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)).remote()
    for shard in shards:
        workdir.progress(shard).unlink(missing_ok=True)
    watch = ShardProgress(config, workdir, shards)
    at_once = min(len(shards), config.train.max_concurrent_shards or len(shards))
    watch.bar.write(f"training {len(shards)} shard(s), {at_once} at once, a Ray Train run each: {shards}")
    done_results = {}
    try:
        with ThreadPoolExecutor(max_workers=max(1, at_once)) as pool:
            pending = {pool.submit(fit, config, workdir, shard, results): shard for shard in shards}
            while pending:
                finished, _ = wait(pending, timeout=2.0, return_when=FIRST_COMPLETED)
                for future in finished:
                    shard = pending.pop(future)
                    future.result()  # a shard that failed past its restarts fails the job, naming its error
                    done_results[shard] = ray.get(results.take.remote(shard))
                    watch.done(shard, done_results[shard])
                watch.refresh()
    finally:
        watch.bar.close()
        ray.kill(results)
    return done_results


class ShardProgress:
    """One bar over every shard's optimizer steps (rate and time left), each shard's slice beside it."""

    def __init__(self, config: Config, workdir: Workdir, shards: list[int]):
        self.workdir, self.slices = workdir, config.partition.num_slices
        self.total = {}
        for shard in shards:
            slice_of = read_parquet(workdir.shard_samples(shard))["slice"]
            self.total[shard] = shard_steps(config, [int((slice_of == r).sum()) for r in range(self.slices)])
        self.step = dict.fromkeys(shards, 0)
        self.stage = dict.fromkeys(shards, "starting")
        self.bar = progress(sum(self.total.values()), "training", unit="step")

    def refresh(self) -> None:
        steps = {}
        for shard in self.step:
            path = self.workdir.progress(shard)
            lines = path.read_text().splitlines() if path.exists() else []
            if lines and self.stage[shard] != "done":
                last = json.loads(lines[-1])
                self.stage[shard] = f"{last['stage'] + bool(last.get('checkpoint'))}/{self.slices} slices"
                steps[shard] = last["step"]
        self.bar.set_postfix_str(", ".join(f"shard {k}: {stage}" for k, stage in self.stage.items()), refresh=False)
        for shard, step in steps.items():
            self._advance(shard, step)
        self.bar.update(0)  # a plain line now and then while Ray Train starts the runs, before any step

    def done(self, shard: int, result: dict) -> None:
        self._advance(shard, self.total[shard])
        self.stage[shard] = "done"
        trained = self.slices - result["restarted_from"]
        resumed = " (the earlier ones from its clean checkpoint)" if trained < self.slices else ""
        self.bar.write(f"  shard {shard}: done in {result['seconds']:.1f}s, {result['samples']} samples, {trained} of {self.slices} "
                       f"slices trained{resumed}, last loss {_last(result['losses'])}")

    def _advance(self, shard: int, step: int) -> None:
        # A resumed shard's first report counts the steps of its clean checkpoints: they were done before.
        step = min(step, self.total[shard])
        if step > self.step[shard]:
            self.bar.update(step - self.step[shard])
            self.step[shard] = step


def _last(losses: list[float]) -> str:
    return f"{losses[-1]:.4f}" if losses else "n/a"
