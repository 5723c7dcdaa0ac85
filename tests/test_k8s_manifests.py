"""Validate the KubeRay manifests in k8s/ against the KubeRay CRD schemas.

The CRDs live outside the repo, in ``<repo>/../shared/kuberay-crds/`` (see its README); the
schema tests skip when that directory is absent, and fail under CI (``conftest.require``). Each
CRD's ``v1`` ``openAPIV3Schema`` is turned into a JSON schema the ``jsonschema`` package can check,
following what the Kubernetes API server does with a structural schema:

* ``x-kubernetes-int-or-string: true`` accepts an integer or a string (``cpu: 4``,
  ``cpu: "4"``, ``memory: 16Gi``); the KubeRay CRDs already spell this out with ``anyOf``,
  the conversion adds it where it is missing;
* unknown fields are errors (``kubectl apply`` uses strict field validation, so a typo such as
  ``minReplica`` is rejected by the server, and silently pruned by older clients);
* ``format: int32`` / ``int64`` are range-checked;
* ``x-kubernetes-list-type: map`` lists must not repeat a key (e.g. two container ports with
  the same ``containerPort``/``protocol``).

CEL rules (``x-kubernetes-validations``) are not evaluated; the KubeRay CRDs only use them for
``managedBy``, ``deletionStrategy`` and immutability, which these manifests do not set.
"""

from __future__ import annotations

import copy
import functools
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from jsonschema import Draft7Validator, FormatChecker, ValidationError, validators

from conftest import require

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
K8S_DIR = REPO / "k8s"
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
API_VERSION = "ray.io/v1"
EXPECTED_MANIFESTS = {"raycluster.yaml", "rayjob-pipeline.yaml", "rayjob-generate.yaml"}

# The CRD files are 1-1.5 MB of YAML: the libyaml loader is ~10x faster than the pure one.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------- CRD -> schema


def _to_json_schema(node: Any) -> Any:
    """Copy an OpenAPI v3 (structural) schema into plain JSON-schema terms."""
    if isinstance(node, list):
        return [_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _to_json_schema(value) for key, value in node.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _list_map_keys(validator, keys, instance, schema) -> Iterator[ValidationError]:
    """``x-kubernetes-list-type: map``: no two items may share the same key fields."""
    if schema.get("x-kubernetes-list-type") != "map" or not validator.is_type(instance, "array"):
        return
    item_props = schema.get("items", {}).get("properties", {})
    seen: dict[tuple, int] = {}
    for index, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k, item_props.get(k, {}).get("default")) for k in keys)
        if key in seen:
            yield ValidationError(
                f"duplicate entry {dict(zip(keys, key))} at items {seen[key]} and {index}"
            )
        seen.setdefault(key, index)


_FORMATS = FormatChecker(formats=())


@_FORMATS.checks("int32")
def _is_int32(value: Any) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_FORMATS.checks("int64")
def _is_int64(value: Any) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


_K8sValidator = validators.extend(
    Draft7Validator, {"x-kubernetes-list-map-keys": _list_map_keys}
)


@functools.lru_cache(maxsize=None)
def _crd_schema(filename: str, version: str = "v1") -> dict:
    """The JSON schema of ``version`` in one CRD file, loaded once per test session."""
    path = CRD_DIR / filename
    with path.open() as f:
        docs = [d for d in yaml.load_all(f, Loader=_Loader) if d]
    crds = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    assert crds, f"{path}: no CustomResourceDefinition document"
    versions = {v["name"]: v for crd in crds for v in crd["spec"]["versions"]}
    assert version in versions, f"{path}: no version {version!r} (has {sorted(versions)})"
    return _to_json_schema(versions[version]["schema"]["openAPIV3Schema"])


def _require_crds() -> None:
    require(CRD_DIR.is_dir(), f"KubeRay CRD schemas not found: {CRD_DIR} is absent")


@functools.lru_cache(maxsize=None)
def _validator(kind: str) -> Draft7Validator:
    return _K8sValidator(_crd_schema(CRD_FILES[kind]), format_checker=_FORMATS)


def schema_errors(doc: dict) -> list[str]:
    """All schema violations of one manifest document, as ``path: message`` lines."""
    _require_crds()
    assert isinstance(doc, dict), f"manifest document is a {type(doc).__name__}, not a mapping"
    kind = doc.get("kind")
    assert kind in CRD_FILES, f"kind {kind!r} has no CRD here (known: {sorted(CRD_FILES)})"
    errors = sorted(_validator(kind).iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


# --------------------------------------------------------------------------- manifests


def _load_manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        with path.open() as f:
            for index, doc in enumerate(yaml.load_all(f, Loader=_Loader)):
                if doc is not None:
                    out.append((f"{path.name}#{index}", doc))
    return out


MANIFESTS = _load_manifests()


def _manifest(name: str) -> dict:
    docs = [doc for doc_id, doc in MANIFESTS if doc_id.split("#")[0] == name]
    assert len(docs) == 1, f"k8s/{name}: expected one document, found {len(docs)}"
    return copy.deepcopy(docs[0])


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for doc_id, doc in MANIFESTS:
        if doc.get("kind") == "RayCluster":
            specs.append((doc_id, doc["spec"]))
        elif doc.get("kind") == "RayJob" and "rayClusterSpec" in doc["spec"]:
            specs.append((doc_id, doc["spec"]["rayClusterSpec"]))
    return specs


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_expected_manifests_exist():
    present = {p.name for p in K8S_DIR.glob("*.yaml")}
    assert EXPECTED_MANIFESTS <= present, f"missing in k8s/: {EXPECTED_MANIFESTS - present}"


@pytest.mark.parametrize("doc_id,doc", MANIFESTS, ids=[m[0] for m in MANIFESTS])
def test_manifest_matches_crd_schema(doc_id, doc):
    assert doc.get("apiVersion") == API_VERSION, f"{doc_id}: apiVersion {doc.get('apiVersion')!r}"
    assert doc.get("metadata", {}).get("name"), f"{doc_id}: metadata.name is required"
    errors = schema_errors(doc)
    if errors:
        pytest.fail(f"{doc_id} violates the {doc['kind']} CRD schema:\n" + "\n".join(errors))


# --------------------------------------------------------------------------- the checker bites


def _gpu_group(spec: dict) -> dict:
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu-workers")


BROKEN = {
    "rayStartParams is a list": (
        "raycluster.yaml",
        lambda d: _gpu_group(d["spec"]).__setitem__("rayStartParams", ["--num-gpus=1"]),
        "workerGroupSpecs.1.rayStartParams",
    ),
    "minReplicas is not an integer": (
        "raycluster.yaml",
        lambda d: _gpu_group(d["spec"]).__setitem__("minReplicas", "two"),
        "workerGroupSpecs.1.minReplicas",
    ),
    "maxReplicas overflows int32": (
        "raycluster.yaml",
        lambda d: _gpu_group(d["spec"]).__setitem__("maxReplicas", 2**31),
        "workerGroupSpecs.1.maxReplicas",
    ),
    "misspelled field": (
        "raycluster.yaml",
        lambda d: _gpu_group(d["spec"]).__setitem__("minReplica", 0),
        "workerGroupSpecs.1",
    ),
    "worker group without groupName": (
        "raycluster.yaml",
        lambda d: _gpu_group(d["spec"]).pop("groupName"),
        "workerGroupSpecs.1",
    ),
    "cpu quantity is not a quantity": (
        "raycluster.yaml",
        lambda d: _containers(d["spec"]["headGroupSpec"])[0]["resources"]["limits"].__setitem__(
            "cpu", "4 cores"
        ),
        "resources.limits.cpu",
    ),
    "cpu quantity is a float": (
        "raycluster.yaml",
        lambda d: _containers(d["spec"]["headGroupSpec"])[0]["resources"]["limits"].__setitem__(
            "cpu", 0.5
        ),
        "resources.limits.cpu",
    ),
    "duplicate container port": (
        "raycluster.yaml",
        lambda d: _containers(d["spec"]["headGroupSpec"])[0]["ports"].append(
            {"containerPort": 8265, "name": "dashboard-again"}
        ),
        "containers.0.ports",
    ),
    "no head group": (
        "rayjob-pipeline.yaml",
        lambda d: d["spec"]["rayClusterSpec"].pop("headGroupSpec"),
        "spec.rayClusterSpec",
    ),
    "shutdownAfterJobFinishes is a string": (
        "rayjob-pipeline.yaml",
        lambda d: d["spec"].__setitem__("shutdownAfterJobFinishes", "true"),
        "spec.shutdownAfterJobFinishes",
    ),
    "auth mode misspelled": (
        "rayjob-pipeline.yaml",
        lambda d: d["spec"]["rayClusterSpec"]["authOptions"].__setitem__("mode", "tokens"),
        "spec.rayClusterSpec.authOptions.mode",
    ),
    "submitter runAsNonRoot misspelled": (
        "rayjob-generate.yaml",
        lambda d: d["spec"]["submitterPodTemplate"]["spec"]["securityContext"].__setitem__("runAsNonroot", True),
        "spec.submitterPodTemplate.spec.securityContext",
    ),
    "entrypoint is a list": (
        "rayjob-generate.yaml",
        lambda d: d["spec"].__setitem__("entrypoint", ["python", "jobs/generate.py"]),
        "spec.entrypoint",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_manifest_fails_validation(case):
    name, mutate, where = BROKEN[case]
    doc = _manifest(name)
    assert not schema_errors(doc), f"k8s/{name} should be valid before mutation"
    mutate(doc)
    errors = schema_errors(doc)
    assert errors, f"{case}: the broken copy of k8s/{name} passed validation"
    assert any(where in e.split(":")[0] for e in errors), f"{case}: errors elsewhere: {errors}"


def test_int_or_string_quantities_accept_integers_and_strings():
    doc = _manifest("raycluster.yaml")
    limits = _containers(doc["spec"]["headGroupSpec"])[0]["resources"]["limits"]
    for cpu, memory in [(4, "16Gi"), ("4", 17179869184), ("3500m", "16G")]:
        limits.update(cpu=cpu, memory=memory)
        assert not schema_errors(doc), (cpu, memory)


# --------------------------------------------------------------------------- semantics


RAYJOBS = [(i, d) for i, d in MANIFESTS if d.get("kind") == "RayJob"]


@pytest.mark.parametrize("doc_id,doc", RAYJOBS, ids=[m[0] for m in RAYJOBS])
def test_rayjob_runs_a_synthset_job(doc_id, doc):
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("python jobs/"), f"{doc_id}: {spec['entrypoint']!r}"
    assert spec.get("submissionMode") == "K8sJobMode", doc_id
    assert spec.get("shutdownAfterJobFinishes") is True, doc_id
    assert spec.get("ttlSecondsAfterFinished") == 3600, doc_id
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and runtime_env.get("working_dir"), (
        f"{doc_id}: runtimeEnvYAML must set working_dir to the repo"
    )
    assert "rayClusterSpec" in spec, f"{doc_id}: expected an embedded rayClusterSpec"


def test_pipeline_rayjob_entrypoint():
    entrypoint = _manifest("rayjob-pipeline.yaml")["spec"]["entrypoint"].split()
    assert entrypoint[:2] == ["python", "jobs/pipeline.py"]
    assert entrypoint[entrypoint.index("--config") + 1] == "conf/prod/loft.yaml"
    assert "output.root=s3://synthset-runs/loft-1m" in entrypoint


@pytest.mark.parametrize("doc_id,doc", RAYJOBS, ids=[m[0] for m in RAYJOBS])
def test_rayjob_entrypoint_names_files_that_exist_and_a_valid_config(doc_id, doc):
    """The script and config the entrypoint names are in the repo (the image copies it), and the config
    with the entrypoint's overrides validates and writes to object storage."""
    import shlex

    from synthset.config import load_config

    args = shlex.split(doc["spec"]["entrypoint"])
    assert args[0] == "python" and (REPO / args[1]).is_file(), f"{doc_id}: {args[1]} not in the repo"
    config = args[args.index("--config") + 1]
    assert (REPO / config).is_file(), f"{doc_id}: {config} not in the repo"
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_config(REPO / config, overrides)
    assert cfg.output.root.startswith(("s3://", "gs://")), f"{doc_id}: output.root {cfg.output.root} is not object storage"
    assert cfg.tracking.uri is None, f"{doc_id}: the MLflow URI should come from the synthset-mlflow Secret"


# --------------------------------------------------------------------------- image and pods

DOCKERFILE = REPO / "Dockerfile"


def _pod_templates() -> list[tuple[str, dict]]:
    """(where, pod template) of every pod the manifests create: head, worker groups, RayJob submitters."""
    out = []
    for doc_id, spec in _cluster_specs():
        out.append((f"{doc_id}/head", spec["headGroupSpec"]["template"]))
        out += [(f"{doc_id}/{g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    for doc_id, doc in RAYJOBS:
        if "submitterPodTemplate" in doc["spec"]:
            out.append((f"{doc_id}/submitter", doc["spec"]["submitterPodTemplate"]))
    return out


PODS = _pod_templates()


def test_the_image_is_built_from_the_repo_dockerfile():
    text = DOCKERFILE.read_text()
    assert (REPO / ".dockerignore").is_file()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON\}\$\{CUDA:\+-gpu\}", text, re.M)
    assert re.search(r"^ARG RAY_VERSION=2\.60\.0$", text, re.M), "the base must match the pinned Ray"
    assert "whl/${CUDA:-cpu}" in text, "CPU torch by default, the CUDA wheel index with --build-arg CUDA=…"
    assert re.search(r"pip install --no-cache-dir \.$", text, re.M), "the image installs the project"
    assert re.search(r"^USER ray$", text, re.M)
    for copied in re.findall(r"^COPY --chown=\S+ (.+) \S+$", text, re.M):
        for path in copied.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which is not in the repo"
    images = {c["image"] for _, pod in PODS for c in pod["spec"]["containers"]}
    assert len(images) == 1 and "synthset" in images.pop(), "every pod runs the one synthset image"


@pytest.mark.parametrize("where,pod", PODS, ids=[p[0] for p in PODS])
def test_pods_run_as_non_root_with_requests_equal_to_limits(where, pod):
    security = pod["spec"].get("securityContext", {})
    assert security.get("runAsNonRoot") is True and security.get("runAsUser", 0) != 0, where
    for container in pod["spec"]["containers"]:
        assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False, where
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], f"{where}: requests != limits (Guaranteed QoS)"


@pytest.mark.parametrize("where,pod", [p for p in PODS if not p[0].endswith("/submitter")],
                         ids=[p[0] for p in PODS if not p[0].endswith("/submitter")])
def test_ray_pods_have_shared_memory_and_no_secret_values(where, pod):
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for container in pod["spec"]["containers"]:
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", where
        for env in container.get("env", []):
            if re.search(r"PASSWORD|SECRET|TOKEN|KEY|MLFLOW_TRACKING_URI", env["name"]):
                assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), (
                    f"{where}: {env['name']} must come from a Secret, not a literal")


def test_token_auth_is_on_and_rayjob_clusters_match_the_raycluster():
    cluster = _manifest("raycluster.yaml")["spec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "synthset-ray-auth"}
    for doc_id, doc in RAYJOBS:
        spec = copy.deepcopy(doc["spec"]["rayClusterSpec"])
        assert spec.pop("authOptions") == {"mode": "token"}, doc_id  # KubeRay makes a per-cluster token
        assert spec == {k: v for k, v in cluster.items() if k != "authOptions"}, (
            f"{doc_id}: rayClusterSpec drifted from k8s/raycluster.yaml")


CLUSTERS = _cluster_specs()


@pytest.mark.parametrize("doc_id,spec", CLUSTERS, ids=[c[0] for c in CLUSTERS])
def test_cluster_groups_are_consistent(doc_id, spec):
    """What the schema cannot say: replica bounds, GPU counts, autoscaling, env."""
    assert spec.get("enableInTreeAutoscaling") is True, doc_id
    head = spec["headGroupSpec"]
    for container in _containers(head):
        for section in ("requests", "limits"):
            assert "nvidia.com/gpu" not in container.get("resources", {}).get(section, {}), (
                f"{doc_id}: the head group should not take a GPU"
            )
    groups = {g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}
    assert {"cpu-workers", "gpu-workers"} <= set(groups), f"{doc_id}: groups {sorted(groups)}"
    for name, group in groups.items():
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        assert isinstance(lo, int) and isinstance(hi, int), f"{doc_id}/{name}: {lo!r}..{hi!r}"
        assert 0 <= lo <= group.get("replicas", lo) <= hi, f"{doc_id}/{name}: replicas {lo}..{hi}"
        gpus = {
            str(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", "0"))
            for c in _containers(group)
        }
        assert len(gpus) == 1, f"{doc_id}/{name}: containers disagree on GPUs: {gpus}"
        want = gpus.pop()
        got = group.get("rayStartParams", {}).get("num-gpus", want)
        assert got == want, f"{doc_id}/{name}: num-gpus {got!r} but pod limit {want!r}"
    gpu = groups["gpu-workers"]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 8), doc_id
    assert gpu["rayStartParams"].get("num-gpus") == "1", doc_id
    assert head["rayStartParams"].get("num-cpus") == "0", f"{doc_id}: tasks and actors must not run on the head"
    for group in [head, *groups.values()]:
        for container in _containers(group):
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["name"] == "synthset-mlflow", doc_id
            for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "synthset-mlflow", (doc_id, var)
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                ref = env[var]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "synthset-s3" and ref.get("optional") is True, (doc_id, var)
