"""Kubeflow Pipelines (v2) for the exact-unlearning system: every step is a KubeRay RayJob.

    action=train  : train -> evaluate
    action=forget : forget (a request file on the shared volume, optional --verify) -> evaluate

A step creates a RayJob in the cluster through the Kubernetes API, from the manifest of the same
name in k8s/jobs/ (read when this file is compiled: clusterSelector, runtimeEnvYAML, ...) with its
entrypoint built from the run's parameters, then polls `.status.jobStatus` until SUCCEEDED (the
step succeeds) or FAILED / STOPPED (the step fails). The RayJobs run on the standing RayCluster
`unlearning` (k8s/base/raycluster.yaml), never two forget rounds at once (the job's round lock).

Compile offline:

    python k8s/pipeline.py --output k8s/pipeline.yaml

The step pods need RBAC on rayjobs in the jobs' namespace: k8s/pipeline-rbac.yaml.
"""

# No `from __future__ import annotations`: kfp reads the component's annotations as types.
import argparse
import json
from pathlib import Path

import yaml
from kfp import compiler, dsl

JOBS_DIR = Path(__file__).resolve().parent / "jobs"
STEPS = ("train", "forget", "evaluate")


def job_template(step: str) -> str:
    """The RayJob manifest k8s/jobs/<step>.yaml as compact JSON (a constant input of the step)."""
    return json.dumps(yaml.safe_load((JOBS_DIR / f"{step}.yaml").read_text()), sort_keys=True, separators=(",", ":"))


@dsl.component(base_image="python:3.11-slim", packages_to_install=["kubernetes==30.1.0"])
def ray_job(
    step: str,
    template: str,
    namespace: str,
    config: str,
    workdir: str,
    request_file: str = "",
    verify: bool = False,
    poll_seconds: float = 15.0,
    timeout_seconds: float = 172800.0,
) -> str:
    """Create the RayJob for `step` and wait for it; returns the RayJob's name."""
    import json
    import re
    import shlex
    import time

    from kubernetes import client
    from kubernetes import config as kube_config
    from kubernetes.client.rest import ApiException

    modules = {"train": "ray_jobs.train", "forget": "ray_jobs.forget", "evaluate": "ray_jobs.evaluate"}
    if step not in modules:
        raise ValueError(f"unknown step {step!r}: expected one of {sorted(modules)}")
    args = ["python", "-m", modules[step], "--config", config, "--workdir", workdir]
    if step == "forget":
        # The ids stay in the file (which the job deletes): never in a parameter, an entrypoint or a log.
        if not re.fullmatch(r"(/[A-Za-z0-9_.-]+)+\.json", request_file) or "/../" in f"{request_file}/":
            raise ValueError(f"forget needs request_file, an absolute path to a .json file on the shared volume, "
                             f"got {request_file!r}")
        args += ["--request-file", request_file]
        if verify:
            args.append("--verify")
    entrypoint = shlex.join(args)

    body = json.loads(template)
    labels = dict(body.get("metadata", {}).get("labels", {}))
    labels["app.kubernetes.io/managed-by"] = "kubeflow-pipelines"
    body["metadata"] = {"generateName": f"unlearning-{step}-", "namespace": namespace, "labels": labels}
    body["spec"]["entrypoint"] = entrypoint

    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    api = client.CustomObjectsApi()
    created = api.create_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", body)
    name = created["metadata"]["name"]
    print(f"created RayJob {namespace}/{name}: {entrypoint}", flush=True)

    deadline = time.monotonic() + timeout_seconds
    last = None
    while True:
        try:
            job = api.get_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", name)
        except ApiException as err:  # API server hiccups: keep polling; anything else is fatal
            if err.status in (429, 500, 502, 503, 504):
                job = None
            else:
                raise
        if job is not None:
            status = job.get("status") or {}
            state = (status.get("jobStatus"), status.get("jobDeploymentStatus"))
            if state != last:
                print(f"RayJob {name}: jobStatus={state[0]} jobDeploymentStatus={state[1]}", flush=True)
                last = state
            if state[0] == "SUCCEEDED":
                return name
            if state[0] in ("FAILED", "STOPPED") or state[1] in ("Failed", "ValidationFailed"):
                raise RuntimeError(
                    f"RayJob {namespace}/{name} ({step}) ended with jobStatus={state[0]} "
                    f"jobDeploymentStatus={state[1]}: {status.get('message', '')}"
                )
        if time.monotonic() > deadline:
            raise TimeoutError(f"RayJob {namespace}/{name} ({step}) not finished after {timeout_seconds:.0f} s")
        time.sleep(poll_seconds)


def _step(step: str, namespace, config, workdir, request_file="", verify=False):
    task = ray_job(
        step=step, template=job_template(step), namespace=namespace, config=config, workdir=workdir,
        request_file=request_file, verify=verify,
    )
    task.set_display_name(step)
    task.set_caching_options(False)  # a step is an action on the cluster, never a cached result
    return task


@dsl.pipeline(
    name="exact-unlearning",
    description="Train K shard adapters then evaluate, or forget a request file's users/interactions exactly then evaluate; "
                "each step a KubeRay RayJob.",
)
def unlearning_pipeline(
    action: str = "train",
    config: str = "configs/movielens.yaml",
    workdir: str = "/data/runs/movielens",
    namespace: str = "unlearning",
    request_file: str = "",
    verify: bool = False,
):
    with dsl.If(action == "train", "train-then-evaluate"):
        train = _step("train", namespace, config, workdir)
        _step("evaluate", namespace, config, workdir).after(train)
    with dsl.Elif(action == "forget", "forget-then-evaluate"):
        forget = _step("forget", namespace, config, workdir, request_file, verify)
        _step("evaluate", namespace, config, workdir).after(forget)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the exact-unlearning Kubeflow pipeline to IR YAML.")
    parser.add_argument("--output", default="pipeline.yaml", help="where to write the compiled pipeline")
    args = parser.parse_args(argv)
    compiler.Compiler().compile(unlearning_pipeline, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
