"""The Ray actor that trains one shard: a thin shell around components.train.train_shard."""

from __future__ import annotations

import json
import resource
import time

import ray

from components.config import Config
from components.data import read_parquet
from components.model import load_base_model, load_tokenizer, make_deterministic
from components.store import Workdir, sample_states
from components.train import save_shard_result, train_shard


@ray.remote
class ShardTrainer:
    def __init__(self, config: dict, workdir: str, shard: int):
        self.config = Config.model_validate(config)
        self.workdir = Workdir(workdir)
        self.shard = shard
        # The thread count is part of the result's bits: it comes from the config, never the host.
        make_deterministic(max(1, int(self.config.train.cpus_per_actor)))
        self.tokenizer = load_tokenizer(self.config.model)

    def _progress(self, event: dict) -> None:
        with self.workdir.progress(self.shard).open("a") as f:
            f.write(json.dumps(event) + "\n")
        if event.get("checkpoint"):
            print(f"[shard {self.shard}] slice {event['stage']} done, checkpoint written (step {event['step']})", flush=True)
        elif event["step"] % 10 == 0:
            print(f"[shard {self.shard}] slice {event['stage']} step {event['step']} loss {event['loss']:.4f}", flush=True)

    def train(self) -> dict:
        started_at = time.time()
        samples = read_parquet(self.workdir.shard_samples(self.shard))
        valid = read_parquet(self.workdir.split("valid"))
        # Only the head runs here: its layers over the samples' stored trunk states.
        base = load_base_model(self.config.model, self.config.seed, self.tokenizer, head_only=True)
        result = train_shard(self.config, self.shard, samples, valid, self.workdir.checkpoints(self.shard), base,
                             self.tokenizer, lambda rows: sample_states(self.config, self.workdir, rows, base, self.tokenizer),
                             progress=self._progress)
        save_shard_result(result, self.workdir.adapter(self.shard), self.config)
        return {
            "shard": self.shard, "valid_predictions": result.valid_predictions, "samples": result.samples,
            "manifest_sha256": result.manifest_sha256, "adapter_sha256": result.adapter_sha256,
            "restarted_from": result.restarted_from, "losses": result.losses, "seconds": result.seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "started_at": started_at, "finished_at": time.time(),
        }
