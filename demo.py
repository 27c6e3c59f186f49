"""The whole story on the embedded defaults: `make demo` (or `python demo.py [--config FILE] [--workdir DIR]`).

MovieLens-100K and SmolLM2-135M: each sample's frozen-trunk states stored once, K LoRA shards
trained at once (a Ray Train run each) and versioned in MLflow, a Ray Serve endpoint that mixes
them per request in one forward pass, one user forgotten exactly (its shard retrained from the last
clean slice checkpoint, then checked bit for bit against that shard trained from scratch without
the user), the evaluation's table, and what it all showed. The screen gets the story only; Ray's,
Serve's and the libraries' own logs go to DIR/logs/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

from components.aggregate import AggregatorState
from components.config import Config, load_config
from components.data import load_interactions_and_items, read_parquet
from components.eval_report import results_table
from components.evaluation import cpu_description
from components.metrics import auc
from components.model import load_base_model, load_tokenizer, make_deterministic, score_states
from components.proof import compare_tensors
from components.store import Workdir, copy_store, prepare, sample_states, write_json
from components.train import ADAPTER_FILE
from components.unlearn import new_request

STEPS = 6
INDENT = "      "
LIKED = ["Star Wars (1977)", "Raiders of the Lost Ark (1981)", "Return of the Jedi (1983)"]
DISLIKED = ["Sleepless in Seattle (1993)"]
CANDIDATES = [172, 98, 88]  # The Empire Strikes Back, The Silence of the Lambs, Sleepless in Seattle


class Story:
    """Numbered steps, each announced with what it does and why, timed, with the machine's load."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.load: list[float] = []
        self.number = 0

    @contextmanager
    def step(self, key: str, title: str, why: str):
        self.number += 1
        print(f"\n[{self.number}/{STEPS}] {title}", flush=True)
        say(why)
        started = time.time()
        yield
        self.seconds[key] = round(time.time() - started, 1)
        self.load.append(os.getloadavg()[0])
        say(f"({self.seconds[key]:.0f} s)")


def say(text: str) -> None:
    print(textwrap.fill(text, 110, initial_indent=INDENT, subsequent_indent=INDENT, break_long_words=False,
                        break_on_hyphens=False), flush=True)


def logs_to_files(logs: Path) -> None:
    """From here on the process's standard error (Ray's, Serve's and MLflow's log lines, library
    warnings, native logs) is logs/driver.log, and so are the raylet's warnings that Ray's driver
    echoes on standard output: the screen holds only the story."""
    logs.mkdir(parents=True, exist_ok=True)
    log = (logs / "driver.log").open("a", buffering=1)
    sys.stderr.flush()
    os.dup2(log.fileno(), 2)
    sys.stdout = StoryOutput(sys.stdout, log)


class StoryOutput:
    """Standard output less the `(raylet) ...` lines, which go to the log: Ray's driver prints the
    raylet's warnings on standard output whatever log_to_driver says (its error-message listener)."""

    def __init__(self, screen, log) -> None:
        self.screen, self.log, self.to_log = screen, log, False

    def write(self, text: str) -> int:
        if "(raylet)" in text:
            self.to_log = True
        elif text != "\n":  # print() writes its end separately: it follows the line it ends
            self.to_log = False
        return (self.log if self.to_log else self.screen).write(text)

    def flush(self) -> None:
        self.screen.flush()
        self.log.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding: the screen's
        return getattr(self.screen, name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    config = load_config(args.config)
    workdir = Workdir(Path(args.workdir))
    workdir.remove()  # the demo always starts from nothing
    logs = workdir.path("logs")
    print(f"Exact unlearning for an LLM recommender ({args.config}: {config.model.label}, K={config.partition.num_shards} "
          f"shards, R={config.partition.num_slices} slices).")
    say(f"Ray's, Serve's and the libraries' own logs go to {logs}/ (driver.log; ray/ holds Ray's session logs, "
        "serve/ the endpoint's), not to this screen.")
    logs_to_files(logs)
    story = Story()
    try:
        tell(story, config, workdir, args)
    except Exception:  # noqa: BLE001 - the story stops, saying why, where the reader is looking
        print(f"\nThe demo failed:\n{traceback.format_exc()}Logs: {logs}/", flush=True)
        return 1
    finally:
        _stop_ray()
    return 0


def tell(story: Story, config: Config, workdir: Workdir, args) -> None:
    model = step_data(story, config, workdir)
    train_report = step_train(story, config, workdir)
    client = step_serve(story, config, workdir, args)
    audit = step_forget(story, config, workdir, client, train_report)
    step_check(story, config, workdir, audit)
    evaluation = step_evaluate(story, config, workdir, args.config)
    ending(story, config, workdir, model, train_report, audit, evaluation)


def step_data(story: Story, config: Config, workdir: Workdir) -> dict:
    depth = config.model.trunk_layers
    with story.step("data", "Samples and the frozen trunk's states",
                    f"Each MovieLens-100K rating becomes a TALLRec prompt (the user's {config.data.history_len} titles rated "
                    f"before it, as liked and disliked; will they like this one? Yes/No; P(yes) is the score), split by "
                    f"time. The first {depth} "
                    f"layers of {config.model.label} stay frozen: every prompt runs through them once, here, and its states are "
                    "stored, so training, forgetting and evaluating run only the layers above."):
        make_deterministic(config.model.trunk_threads)  # a state's bits can depend on the thread count
        tokenizer = load_tokenizer(config.model)
        model = load_base_model(config.model, config.seed, tokenizer)
        splits = prepare(config, workdir, model, tokenizer, log=lambda _: None)
        test = splits["test"]
        untuned = auc(test["label"], score_states(model, tokenizer, sample_states(config, workdir, test, model, tokenizer),
                                                  config.model))
        say(f"{len(splits['train'])} training, {len(splits['valid'])} validation and {len(test)} test samples; states in "
            f"{workdir.trunk.root}. The untuned model's test AUC: {untuned:.3f} (0.5 is chance).")
    return {"untuned_auc": untuned, "trained_layers": model.config.num_hidden_layers - depth}


def step_train(story: Story, config: Config, workdir: Workdir) -> dict:
    from ray_jobs.common import connect_ray
    from ray_jobs.orchestration import train_workdir

    with story.step("train", f"Train one LoRA adapter per shard, {config.partition.num_shards} at once on Ray Train",
                    f"A {config.partition.method} partition places each sample by centroids fitted on public catalogue data "
                    + ("and its user's own samples (a user's samples share one shard)" if config.partition.method == "semantic-user"
                       else "and the sample alone")
                    + ", so forgetting a user moves no one else's samples. Each shard trains alone, "
                    f"slice by slice ({config.partition.num_slices} slices, a checkpoint after each), and every adapter is "
                    "registered in MLflow with its lineage."):
        context = connect_ray(address="local", log_to_driver=False)  # a Ray of its own; workers' output stays in its logs
        workdir.path("logs", "ray").symlink_to(Path(context.address_info["session_dir"]) / "logs")
        say(f"Ray dashboard: http://{context.dashboard_url}" if context.dashboard_url else "Ray started (no dashboard).")
        report = train_workdir(config, workdir)
        for shard, info in report["shards"].items():
            say(f"shard {shard}: {info['samples']} samples, {info['seconds']:.0f} s, registered as "
                f"{config.experiment}.shard-{shard} v{info['version']}")
        say(f"adapter set v{report['adapter_set_version']} is live. MLflow UI: .venv/bin/mlflow ui --backend-store-uri "
            f"sqlite:///{workdir.root.resolve() / 'mlflow.db'} --port 5000")
    return report


def step_serve(story: Story, config: Config, workdir: Workdir, args):
    from ray import serve

    from serving.app import build_app
    from serving.client import RecommenderClient

    with story.step("serve", "Serve the live adapter set (Ray Serve on 127.0.0.1)",
                    "For each request the endpoint weighs the K adapters by how well each predicted the validation samples "
                    "nearest to it (APA's sample-adaptive attention) and merges them at parameter level: one forward pass, "
                    "as with a single adapter, not K."):
        serve.start(http_options={"host": "127.0.0.1", "port": args.port},
                    logging_config={"logs_dir": str(workdir.path("logs", "serve").resolve())})
        serve.run(build_app({"config": args.config, "workdir": str(workdir.root)}), blocking=False)
        client = RecommenderClient(f"http://127.0.0.1:{args.port}")
        _wait_healthy(client)
        show_prediction(config, client)
    return client


def show_prediction(config: Config, client) -> None:
    titles = load_interactions_and_items(config.data)[1].set_index("item_id")["title"]
    started = time.time()
    answer = client.predict(liked=LIKED, disliked=DISLIKED, candidates=CANDIDATES)
    say(f"POST /v1/predict, liked {', '.join(LIKED)}; disliked {', '.join(DISLIKED)} "
        f"(answered in {1000 * (time.time() - started):.0f} ms, adapter set v{answer.adapter_set_version}):")
    for row in answer.predictions:
        say(f"  P(yes) {row.p_yes:.3f}  {titles.get(row.item_id, row.item_id)}")
    say("shard weights (mean over the candidates): " + ", ".join(f"{k}: {w:.2f}" for k, w in sorted(answer.weights.items())))


def _wait_healthy(client, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if client.health().get("status") == "ok":
                return
        except Exception:  # noqa: BLE001 - the replica is still loading
            pass
        time.sleep(1)
    raise TimeoutError(f"the endpoint was not healthy within {timeout_s:.0f} s")


def _wait_for_set(client, version: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while str(client.adapters()["adapter_set_version"]) != version:
        if time.time() > deadline:
            raise TimeoutError(f"serving did not load adapter set v{version} within {timeout_s:.0f} s")
        time.sleep(0.5)


def step_forget(story: Story, config: Config, workdir: Workdir, client, train_report: dict) -> dict:
    from ray_jobs import forget as forget_job

    with story.step("forget", "Forget a user",
                    "The request masks the user's shard in serving at once, deletes the user's samples and their stored "
                    "states, retrains only that shard from its last checkpoint made before the user's first slice, "
                    "registers and swaps in the new version, purges every version and artifact the user's data touched, "
                    "and writes an audit record naming the user only by a salted hash."):
        shard = read_parquet(workdir.shard_samples(0))
        user = shard["user_id"].iloc[0]
        request = new_request(workdir, [user], [], "demo-forget")
        # The id itself is never printed: the screen and the logs are places a forgotten id must not reach.
        say(f"the first user of shard 0: {int((shard['user_id'] == user).sum())} training sample(s), "
            f"in shard(s) {request.affected_shards}")
        [audit] = forget_job.process(config, workdir)
        seconds = sum(audit["seconds"].values())
        versions = ", ".join(f"shard {k} v{v} -> v{audit['new_versions'][k]}" for k, v in audit["old_versions"].items())
        say(f"forgotten in {seconds:.1f} s against {train_report['seconds']:.1f} s for the full train job "
            f"({train_report['seconds'] / seconds:.1f}x faster): {versions}, adapter set v{audit['old_adapter_set']} -> "
            f"v{audit['new_adapter_set']}; {len(audit['purged'])} versions purged with their artifacts; the scan for the "
            f"user's ids in the work dir and the registry: {'clean' if audit['scan']['clean'] else audit['scan']['findings']}; "
            f"audit record {workdir.path('audit', audit['request_id'] + '.json')}")
        _wait_for_set(client, str(audit["new_adapter_set"]))  # the replicas follow the registry's alias
        show_prediction(config, client)
    return audit


def step_check(story: Story, config: Config, workdir: Workdir, audit: dict) -> None:
    from ray_jobs.shard_training import train_shards

    [shard] = audit["affected_shards"]
    with story.step("check", f"Check: shard {shard} equals a training from scratch without the user",
                    f"Shard {shard} is trained again from nothing on its current samples, in a copy of the store, and "
                    "compared with the live one bit for bit: every adapter tensor and every validation prediction the "
                    "attention uses. The other shards never held the user's samples and were not touched."):
        reference = Workdir(workdir.path("check"))
        copy_store(workdir, reference)
        reference.shard_samples(shard).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(workdir.shard_samples(shard), reference.shard_samples(shard))
        result = train_shards(config, reference, [shard])[shard]
        diffs = compare_tensors(*(torch.load(w.adapter(shard) / ADAPTER_FILE, weights_only=True) for w in (workdir, reference)))
        live = AggregatorState.load(workdir.path("aggregator")).predictions[shard]
        same_predictions = torch.equal(live, torch.tensor(result["valid_predictions"]))
        reference.remove()
        if diffs or not same_predictions:
            raise AssertionError(f"shard {shard} differs from its training from scratch: tensors {diffs[:5]}, "
                                 f"validation predictions {'equal' if same_predictions else 'differ'}")
        say(f"identical: {len(torch.load(workdir.adapter(shard) / ADAPTER_FILE, weights_only=True))} adapter tensors and "
            f"{len(live)} validation predictions, bit for bit.")


def step_evaluate(story: Story, config: Config, workdir: Workdir, config_file: str) -> dict:
    from ray_jobs import evaluate as evaluate_job

    with story.step("evaluate", "Evaluate on the test split",
                    "APA's mixture, the uniform average of the same adapters and one shard alone, scored as Ray Data jobs "
                    "over the stored states, beside scores that need no model (the floors any recommender must beat), "
                    "each AUC with a 95% bootstrap interval."):
        evaluation = evaluate_job.run(config, workdir, evaluate_job.DEMO_METHODS, config_file=config_file)
    return evaluation


def ending(story: Story, config: Config, workdir: Workdir, model: dict, train_report: dict, audit: dict,
           evaluation: dict) -> None:
    print(f"\nResults (`unlearn report {workdir.root}` prints this table again):\n", flush=True)
    print(results_table(evaluation, f"unlearn report {workdir.root}"))
    methods = evaluation["methods"]
    apa, floor = methods["apa"], methods["floor-history"]
    [shard] = audit["affected_shards"]
    redone = config.partition.num_slices - audit["slice_restarted_from"][str(shard)]
    forget_s = sum(audit["seconds"].values())
    print("What this showed:")
    say(f"- Exact forgetting: the user's samples are gone, shard {shard} was retrained ({redone} of "
        f"{config.partition.num_slices} slices, the rest from a clean checkpoint) and equals, bit for bit, that shard "
        "trained from scratch without the user; old versions and artifacts purged, the scan clean, an audit record.")
    say(f"- Its cost: {forget_s:.0f} s against {train_report['seconds']:.0f} s for training all "
        f"{config.partition.num_shards} shards ({train_report['seconds'] / forget_s:.1f}x faster); the full train job "
        "is what a model without shards would redo for every request.")
    say(f"- Serving: one endpoint mixes the {config.partition.num_shards} adapters per request in one forward pass (the "
        "serving row above: APA's time against a single adapter's).")
    verdict = "above" if apa["auc"] > floor["auc"] else "not above"
    say(f"- What this scale lets the model learn: with {sum(s['samples'] for s in train_report['shards'].values())} training "
        f"samples, LoRA in {model['trained_layers']} layers and "
        f"{config.train.epochs} epoch{'s' if config.train.epochs > 1 else ''}, APA's AUC {apa['auc']:.3f} is {verdict} "
        f"the history floor {floor['auc']:.3f} (the "
        f"untuned model: {model['untuned_auc']:.3f}); the intervals show how wide the noise is on {evaluation['n_test']} test samples. "
        "At 4096 training samples and 1000 test samples one adapter reaches 0.711 and APA 0.701 against a history floor "
        "of 0.697 (2026-12-03), the APA paper's LLaMA-7B 0.743: docs/results.md.")
    timings(story, workdir)


def timings(story: Story, workdir: Workdir) -> None:
    """Each step's seconds and the total since the process started (imports included, Ray's shutdown
    after this line not), with the machine and its load: DIR/reports/demo.json."""
    total = round(time.time() - psutil.Process().create_time(), 1)
    story.seconds["start-up"] = round(total - sum(story.seconds.values()), 1)  # imports, loading, the summary
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_description(), "cpus": os.cpu_count(),
              "seconds": story.seconds, "total_seconds": total, "max_load_average_1min": round(max(story.load), 2)}
    write_json(workdir.path("reports", "demo.json"), record)
    print(f"\nTime per step on this machine ({record['cpu']}, {record['cpus']} CPUs, highest 1-minute load average "
          f"{record['max_load_average_1min']}): " + ", ".join(f"{k} {v:.0f} s" for k, v in story.seconds.items())
          + f"; total {total / 60:.1f} min ({workdir.path('reports', 'demo.json')}).")
    print(f"Logs: {workdir.path('logs')}/", flush=True)


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        from ray import serve

        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
