"""deploy/: every Kubernetes manifest and the Compose file are checked against their schemas.

- Kubernetes resources: ``kubernetes-validate`` with its bundled (offline) schemas of
  Kubernetes ``K8S_VERSION``, in strict mode, so an unknown or misspelled field fails too.
- Kustomize patches: applied to the resource they target (which must exist), and the
  result validated like any resource; a ``$patch: delete`` must name an existing resource.
- KEDA ``ScaledObject`` (a CRD, no Kubernetes schema): the ``cloudcoil-models-keda`` models,
  generated from KEDA's CRD, plus a strict check that no field was dropped by them; the
  trigger metadata is free-form in the CRD, so each trigger type's required keys are checked
  here, and the HPA behaviour against Kubernetes' own schema.
- ``Kustomization`` (kustomize's config, no schema shipped): known top-level fields only, every
  resource and patch it names exists, every manifest in its directory is used (or listed in
  ``ALTERNATIVES``), every generated Secret's file is documented.
- After the patches, at most one autoscaler per workload, and each names a workload that exists.
- ``docker-compose.yml``: the Compose specification's JSON schema, as ``check-jsonschema``
  ships it, plus the references Compose resolves itself (services, networks, volumes).

The negative cases break a copy of deploy/ one way each and show every check rejects it.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication
from pydantic import ValidationError

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

K8S_VERSION = "1.30"
"""The oldest Kubernetes the manifests must apply to (autoscaling/v2, PodSecurity's fields)."""

ALTERNATIVES = {"k8s-autoscaling/hpa-external.yaml", "k8s-autoscaling/hpa-queue-depth.yaml"}
"""Manifests no kustomization lists: each replaces keda.yaml where KEDA is not installed."""

NOT_MANIFESTS = {"observability"}
"""Directories under deploy/ checked elsewhere (tests/deploy/test_observability_files.py)."""

KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "metadata",
    "resources",
    "components",
    "crds",
    "namespace",
    "namePrefix",
    "nameSuffix",
    "labels",
    "commonLabels",
    "commonAnnotations",
    "images",
    "replicas",
    "patches",
    "patchesStrategicMerge",
    "patchesJson6902",
    "replacements",
    "vars",
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
    "generators",
    "transformers",
    "validators",
    "openapi",
    "configurations",
    "buildMetadata",
    "sortOptions",
    "helmCharts",
    "helmGlobals",
}
"""Top-level fields of kustomize's ``Kustomization`` (kustomize/api/types/kustomization.go)."""

KEDA_TRIGGER_KEYS = {
    "redis": ({"listName"}, [{"address"}, {"host", "port"}]),
    "prometheus": ({"serverAddress", "query", "threshold"}, []),
}
"""KEDA trigger type -> (metadata keys it requires, one of these key sets is also required)."""

AUTOSCALED_KINDS = {"Deployment", "StatefulSet"}

Problems = list[str]


# -- loading ----------------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of a file (empty documents dropped); a fresh copy each call."""
    return copy.deepcopy(_parsed(path.read_text()))


def load_one(path: Path) -> dict[str, Any]:
    """The first YAML document of a file, ``{}`` for an empty one."""
    docs = load_docs(path)
    return docs[0] if docs else {}


@functools.lru_cache(maxsize=256)
def _parsed(text: str) -> list[dict[str, Any]]:
    # The same files are read by many checks: parse each text once (C loader where built).
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(text, Loader=loader) if doc]


def manifest_files(root: Path) -> list[Path]:
    """Every Kubernetes YAML file under ``root`` (the Compose file and observability/ aside)."""
    found = []
    for path in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]):
        rel = path.relative_to(root)
        if rel.parts[0] in NOT_MANIFESTS or path.name == "docker-compose.yml":
            continue
        found.append(path)
    return found


def key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc.get("kind", "?"), (doc.get("metadata") or {}).get("name", "?")


def kustomization_of(directory: Path) -> Path | None:
    path = directory / "kustomization.yaml"
    return path if path.exists() else None


def patch_paths(kustomization: dict[str, Any]) -> list[str]:
    return [p["path"] for p in kustomization.get("patches") or [] if isinstance(p, dict) and "path" in p]


# -- Kubernetes resources ------------------------------------------------------------------------


def k8s_problems(doc: dict[str, Any], where: str) -> Problems:
    """kubernetes-validate, strict, against K8S_VERSION's schemas; a kind without schema is a problem."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path) or "(top)"
        return [f"{where}: {path}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{where}: {exc.message}"]
    return []


def merge_patch(target: dict[str, Any], patch: dict[str, Any], where: str, problems: Problems) -> Any:
    """A strategic-merge patch made of maps only (lists merge by key in kustomize: not modelled)."""
    merged = copy.deepcopy(target)
    for name, value in patch.items():
        if isinstance(value, list):
            problems.append(f"{where}: {name}: a list in a patch; extend merge_patch before using one")
        elif isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = merge_patch(merged[name], value, where, problems)
        else:
            merged[name] = copy.deepcopy(value)
    return merged


def build(directory: Path, problems: Problems) -> list[dict[str, Any]]:
    """What ``kubectl apply -k directory`` would apply (resources, then patches), enough to check."""
    kpath = kustomization_of(directory)
    if kpath is None:
        problems.append(f"{directory}: no kustomization.yaml")
        return []
    kustomization = load_one(kpath)
    docs: list[dict[str, Any]] = []
    for entry in kustomization.get("resources") or []:
        path = (directory / entry).resolve()
        if path.is_dir():
            docs.extend(build(path, problems))
        elif path.is_file():
            docs.extend(load_docs(path))
    for generator in kustomization.get("secretGenerator") or []:
        # Generated from files that are never committed: only the name matters to the checks.
        docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": generator.get("name")}})
    for entry in patch_paths(kustomization):
        path = directory / entry
        if not path.is_file():
            continue  # reported by kustomization_problems
        for patch in load_docs(path):
            matches = [i for i, doc in enumerate(docs) if key(doc) == key(patch)]
            where = f"{path.relative_to(DEPLOY.parent) if path.is_relative_to(DEPLOY.parent) else path}"
            if not matches:
                problems.append(f"{where}: patches {key(patch)}, which {directory.name} does not define")
                continue
            if patch.get("$patch") == "delete":
                del docs[matches[0]]
            else:
                docs[matches[0]] = merge_patch(docs[matches[0]], patch, where, problems)
    return docs


def kustomization_problems(path: Path, root: Path) -> Problems:
    """Known fields; every resource, patch and Secret file named is accounted for; no stray manifest."""
    where = str(path.relative_to(root))
    doc = load_one(path)
    problems: Problems = []
    if (doc.get("apiVersion"), doc.get("kind")) != ("kustomize.config.k8s.io/v1beta1", "Kustomization"):
        problems.append(f"{where}: apiVersion/kind is not kustomize.config.k8s.io/v1beta1 Kustomization")
    problems += [f"{where}: unknown field {name!r}" for name in sorted(set(doc) - KUSTOMIZATION_FIELDS)]
    directory = path.parent
    used = set()
    for entry in [*(doc.get("resources") or []), *patch_paths(doc)]:
        target = (directory / entry).resolve()
        if target.is_dir():
            if kustomization_of(target) is None:
                problems.append(f"{where}: {entry} is a directory without kustomization.yaml")
        elif not target.is_file():
            problems.append(f"{where}: {entry} does not exist")
        used.add(target)
    for patch in doc.get("patches") or []:
        if not isinstance(patch, dict) or not ({"path", "patch"} & set(patch)):
            problems.append(f"{where}: a patch needs path: or patch: ({patch!r})")
    secrets_readme = directory / "secrets" / "README.md"
    documented = secrets_readme.read_text() if secrets_readme.exists() else ""
    for generator in doc.get("secretGenerator") or []:
        for env in generator.get("envs") or []:
            if f"`{Path(env).name}`" not in documented:
                problems.append(f"{where}: secret file {env} is not described in secrets/README.md")
    for manifest in sorted(directory.glob("*.yaml")):
        rel = str(manifest.relative_to(root))
        if manifest != path and manifest.resolve() not in used and rel not in ALTERNATIVES:
            problems.append(f"{where}: {manifest.name} is in its directory but not listed")
    return problems


def keda_model_problems(doc: dict[str, Any], where: str) -> Problems:
    """KEDA's CRD as the cloudcoil models, and no field the models dropped (unknown to the CRD)."""
    model_cls = {"ScaledObject": ScaledObject, "TriggerAuthentication": TriggerAuthentication}.get(
        doc["kind"]
    )
    if model_cls is None:
        return [f"{where}: no check for KEDA kind {doc['kind']!r} (add its model here)"]
    try:
        model = model_cls.model_validate(doc)
    except ValidationError as exc:
        return [f"{where}: {err['loc']}: {err['msg']}" for err in exc.errors()]
    return [
        f"{where}: {p}: not a field of {doc['kind']}"
        for p in dropped(doc, model.model_dump(by_alias=True, exclude_unset=True, mode="json"))
    ]


def scaled_object_problems(doc: dict[str, Any], where: str) -> Problems:
    """The CRD, each trigger's required metadata (free-form in the CRD), the HPA behaviour."""
    problems = keda_model_problems(doc, where)
    if problems:
        return problems
    spec = doc["spec"]
    if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
        problems.append(f"{where}: minReplicaCount > maxReplicaCount")
    for i, trigger in enumerate(spec.get("triggers") or []):
        kind = trigger.get("type")
        if kind not in KEDA_TRIGGER_KEYS:
            problems.append(f"{where}: triggers.{i}: no check for trigger type {kind!r} (add it here)")
            continue
        required, one_of = KEDA_TRIGGER_KEYS[kind]
        metadata = set(trigger.get("metadata") or {})
        problems += [
            f"{where}: triggers.{i} ({kind}): metadata.{k} is required" for k in sorted(required - metadata)
        ]
        if one_of and not any(keys <= metadata for keys in one_of):
            problems.append(f"{where}: triggers.{i} ({kind}): metadata needs one of {one_of}")
        if kind == "redis" and not (trigger.get("authenticationRef") or "passwordFromEnv" in metadata):
            problems.append(f"{where}: triggers.{i} (redis): no authenticationRef; Redis requires a password")
    behavior = ((spec.get("advanced") or {}).get("horizontalPodAutoscalerConfig") or {}).get("behavior")
    if behavior is not None:
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "keda"},
            "spec": {
                "scaleTargetRef": {"kind": "Deployment", "name": "x"},
                "maxReplicas": 1,
                "behavior": behavior,
            },
        }
        problems += k8s_problems(hpa, f"{where}: advanced.horizontalPodAutoscalerConfig")
    return problems


def dropped(given: Any, kept: Any, path: str = "") -> list[str]:
    """Keys in ``given`` that the model did not keep: fields the CRD does not have."""
    if isinstance(given, dict) and isinstance(kept, dict):
        out = []
        for name, value in given.items():
            sub = f"{path}.{name}" if path else str(name)
            out += [sub] if name not in kept else dropped(value, kept[name], sub)
        return out
    if isinstance(given, list) and isinstance(kept, list):
        return [
            p for i, (g, k) in enumerate(zip(given, kept, strict=False)) for p in dropped(g, k, f"{path}.{i}")
        ]
    return []


def autoscaler_problems(docs: list[dict[str, Any]], where: str) -> Problems:
    """Each autoscaler names a workload that exists; no workload has two (they would fight)."""
    workloads = {key(doc) for doc in docs if doc.get("kind") in AUTOSCALED_KINDS}
    seen: dict[tuple[str, str], str] = {}
    problems = []
    for doc in docs:
        if doc.get("kind") not in {"HorizontalPodAutoscaler", "ScaledObject"}:
            continue
        ref = (doc.get("spec") or {}).get("scaleTargetRef") or {}
        target = (ref.get("kind", "Deployment"), ref.get("name", "?"))
        name = f"{doc['kind']}/{key(doc)[1]}"
        if target not in workloads:
            problems.append(f"{where}: {name} scales {target}, which is not defined")
        if target in seen:
            problems.append(f"{where}: {name} and {seen[target]} both scale {target}")
        seen[target] = name
    return problems


def reference_problems(docs: list[dict[str, Any]], where: str) -> Problems:
    """KEDA's references: a trigger's TriggerAuthentication and the Secrets it reads exist."""
    present = {key(doc) for doc in docs}
    problems = []
    for doc in docs:
        spec = doc.get("spec") or {}
        for trigger in spec.get("triggers") or [] if doc.get("kind") == "ScaledObject" else []:
            ref = trigger.get("authenticationRef")
            if ref and (ref.get("kind", "TriggerAuthentication"), ref.get("name")) not in present:
                problems.append(f"{where}: {key(doc)} names {ref}, which is not defined")
        for secret in spec.get("secretTargetRef") or [] if doc.get("kind") == "TriggerAuthentication" else []:
            if ("Secret", secret.get("name")) not in present:
                problems.append(
                    f"{where}: {key(doc)} reads Secret {secret.get('name')!r}, which is not defined"
                )
    return problems


def manifest_problems(path: Path, root: Path) -> Problems:
    """Everything checked about one file under deploy/ (root is the deploy directory)."""
    where = str(path.relative_to(root))
    if path.name == "kustomization.yaml":
        problems = kustomization_problems(path, root)
        docs = build(path.parent, problems)
        return problems + autoscaler_problems(docs, where) + reference_problems(docs, where)
    kpath = kustomization_of(path.parent)
    kustomization = load_one(kpath) if kpath else {}
    if path.name in patch_paths(kustomization or {}):
        return patch_problems(path, where)
    problems = []
    base = build(path.parent, []) if kpath else []
    for i, doc in enumerate(load_docs(path)):
        at = f"{where}[{i}] {doc.get('kind')}"
        if not {"apiVersion", "kind", "metadata"} <= set(doc):
            problems.append(f"{at}: not a Kubernetes object (apiVersion, kind, metadata)")
        elif doc["kind"] == "ScaledObject" and doc["apiVersion"].startswith("keda.sh/"):
            problems += scaled_object_problems(doc, at)
        elif doc["apiVersion"].startswith("keda.sh/"):
            problems += keda_model_problems(doc, at)
        else:
            problems += k8s_problems(doc, at)
        if where in ALTERNATIVES:
            # Swapped in for keda.yaml: it must fit the build without it.
            others = [d for d in base if d.get("kind") != "ScaledObject"]
            problems += autoscaler_problems([*others, doc], at)
    return problems


def patch_problems(path: Path, where: str) -> Problems:
    """A patch must target an object of the base; applied, that object must validate."""
    problems: Problems = []
    docs = build(path.parent, problems)
    problems = [p for p in problems if path.name in p]
    patched = {key(patch) for patch in load_docs(path)}
    for doc in docs:
        if key(doc) in patched:  # a deleted object is gone from docs: nothing left to validate
            problems += k8s_problems(doc, f"{where} applied to {key(doc)}")
    return problems


# -- Compose ---------------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    """The Compose specification's schema (compose-spec/compose-spec, Apache-2.0), from check-jsonschema."""
    resource = files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema: dict[str, Any] = json.loads(resource.read_text())
    return schema


def compose_problems(path: Path) -> Problems:
    """The schema, then what ``docker compose config`` resolves: services, networks, volumes named exist."""
    doc = yaml.safe_load(path.read_text())
    schema = compose_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)
    problems = [
        f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    if problems:
        return problems
    services = doc.get("services") or {}
    networks = set(doc.get("networks") or {}) | {"default"}
    volumes = set(doc.get("volumes") or {})
    for name, service in services.items():
        deps = service.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else list(deps):
            if dep not in services:
                problems.append(f"services.{name}.depends_on: no service {dep!r}")
        nets = service.get("networks") or []
        for net in nets if isinstance(nets, list) else list(nets):
            if net not in networks:
                problems.append(f"services.{name}.networks: no network {net!r}")
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source and not source.startswith((".", "/", "~", "$")) and source not in volumes:
                problems.append(f"services.{name}.volumes: no volume {source!r}")
    return problems


@pytest.fixture(autouse=True, scope="module")
def _schemas_read_once() -> Any:
    """kubernetes-validate reads two schema files per object validated: read each once here."""
    import kubernetes_validate.utils as kv_utils

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            kv_utils, "schema_contents", functools.lru_cache(maxsize=None)(kv_utils.schema_contents)
        )
        yield


# -- the tests ----------------------------------------------------------------------------------

MANIFESTS = manifest_files(DEPLOY)


def test_every_file_under_deploy_is_checked() -> None:
    """A new YAML or JSON file under deploy/ lands in one of the checks, or this fails."""
    checked = {*MANIFESTS, DEPLOY / "docker-compose.yml"}
    others = {p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml", ".json"}} - checked
    stray = sorted(
        str(p.relative_to(DEPLOY)) for p in others if p.relative_to(DEPLOY).parts[0] not in NOT_MANIFESTS
    )
    assert stray == []
    assert len(MANIFESTS) >= 15, [str(p) for p in MANIFESTS]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_validates(path: Path) -> None:
    assert manifest_problems(path, DEPLOY) == []


def test_compose_file_validates_against_the_compose_specification() -> None:
    schema = compose_schema()
    assert schema["title"] == "Compose Specification"
    assert compose_problems(DEPLOY / "docker-compose.yml") == []


def external_metric_problems(path: Path) -> Problems:
    """Each External metric an HPA reads is one a prometheus-adapter rule in its file's comments serves."""
    served = set(re.findall(r'name: \{as: "([^"]+)"\}', path.read_text()))
    problems = []
    for doc in load_docs(path):
        for metric in (doc.get("spec") or {}).get("metrics") or []:
            if metric.get("type") == "External":
                name = metric["external"]["metric"]["name"]
                if name not in served:
                    problems.append(f"{path.name}: external metric {name!r} has no prometheus-adapter rule")
    return problems


@pytest.mark.parametrize("name", sorted(ALTERNATIVES))
def test_every_external_metric_has_its_adapter_rule(name: str, tmp_path: Path) -> None:
    path = DEPLOY / name
    assert external_metric_problems(path) == []
    broken = tmp_path / path.name
    broken.write_text(path.read_text().replace('name: {as: "', 'name: {as: "x'))
    assert external_metric_problems(broken)


@pytest.mark.integration
def test_the_queue_depth_hpa_selects_a_series_dmipro_emits(redis_server: str) -> None:
    """dmipro.queue.depth, as Prometheus names it, with the labels a real broker reading carries."""
    from dmipro.subscribers._queues import queue_depths

    readings = queue_depths(f"{redis_server}/0")
    emitted = [{k.replace(".", "_"): v for k, v in attrs.items()} for attrs, _ in readings]
    hpa = load_one(DEPLOY / "k8s-autoscaling" / "hpa-queue-depth.yaml")
    metric = hpa["spec"]["metrics"][0]["external"]["metric"]
    assert metric["name"] == "dmipro.queue.depth".replace(".", "_")
    assert metric["selector"]["matchLabels"] in emitted, emitted


# -- each check rejects a broken file ------------------------------------------------------------------


def _edit_yaml(rel: str, edit: Callable[[list[dict[str, Any]]], None]) -> Callable[[Path], Path]:
    def apply(root: Path) -> Path:
        path = root / rel
        docs = load_docs(path)
        edit(docs)
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        return path

    return apply


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = docs[0]["spec"]["template"]["spec"]["containers"][0]
    return container


def _trigger(docs: list[dict[str, Any]]) -> dict[str, Any]:
    trigger: dict[str, Any] = docs[0]["spec"]["triggers"][0]
    return trigger


BROKEN: dict[str, tuple[Callable[[Path], Path], str]] = {
    "misspelled container field": (
        _edit_yaml("k8s/work.yaml", lambda d: _container(d).update(imagePullPolcy="Always")),
        "'imagePullPolcy' was unexpected",
    ),
    "replicas not a number": (
        _edit_yaml("k8s/coordinator.yaml", lambda d: d[0]["spec"].update(replicas="two")),
        "spec.replicas: 'two' is not of type",
    ),
    "HPA without scaleTargetRef": (
        _edit_yaml("k8s-autoscaling/hpa-external.yaml", lambda d: d[0]["spec"].pop("scaleTargetRef")),
        "'scaleTargetRef' is a required property",
    ),
    "HPA on a workload that does not exist": (
        _edit_yaml(
            "k8s-autoscaling/hpa-external.yaml",
            lambda d: d[0]["spec"]["scaleTargetRef"].update(name="dmipro-wrok"),
        ),
        "which is not defined",
    ),
    "kind without a schema": (
        _edit_yaml("k8s/config.yaml", lambda d: d[0].update(apiVersion="example.com/v1", kind="Widget")),
        "Couldn't find schema for kind Widget",
    ),
    "ScaledObject field KEDA does not have": (
        _edit_yaml("k8s-autoscaling/keda.yaml", lambda d: d[0]["spec"].update(maxReplicas=16)),
        "spec.maxReplicas: not a field of ScaledObject",
    ),
    "ScaledObject without a target": (
        _edit_yaml("k8s-autoscaling/keda.yaml", lambda d: d[0]["spec"]["scaleTargetRef"].pop("name")),
        "'scaleTargetRef', 'name'",
    ),
    "redis trigger without its list": (
        _edit_yaml("k8s-autoscaling/keda.yaml", lambda d: _trigger(d)["metadata"].pop("listName")),
        "metadata.listName is required",
    ),
    "redis trigger without the password": (
        _edit_yaml("k8s-autoscaling/keda.yaml", lambda d: _trigger(d).pop("authenticationRef")),
        "no authenticationRef; Redis requires a password",
    ),
    "trigger authentication that is not defined": (
        _edit_yaml(
            "k8s-autoscaling/keda.yaml", lambda d: _trigger(d)["authenticationRef"].update(name="redis")
        ),
        "'name': 'redis'}, which is not defined",
    ),
    "trigger authentication from a Secret that is not generated": (
        _edit_yaml(
            "k8s-autoscaling/keda.yaml", lambda d: d[1]["spec"]["secretTargetRef"][0].update(name="redis")
        ),
        "reads Secret 'redis', which is not defined",
    ),
    "trigger authentication field KEDA does not have": (
        _edit_yaml("k8s-autoscaling/keda.yaml", lambda d: d[1]["spec"].update(secretRef=[])),
        "spec.secretRef: not a field of TriggerAuthentication",
    ),
    "trigger type nobody checks": (
        _edit_yaml("k8s-autoscaling/keda.yaml", lambda d: _trigger(d).update(type="rabbitmq")),
        "no check for trigger type 'rabbitmq'",
    ),
    "bad HPA behaviour in a ScaledObject": (
        _edit_yaml(
            "k8s-autoscaling/keda.yaml",
            lambda d: d[0]["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"][
                "scaleDown"
            ].update(stabilizationWindowSeconds="5m"),
        ),
        "'stabilizationWindowSeconds'): Input should be a valid integer",
    ),
    "kustomization lists a missing file": (
        _edit_yaml("k8s/kustomization.yaml", lambda d: d[0]["resources"].append("ingress.yaml")),
        "ingress.yaml does not exist",
    ),
    "kustomization field misspelled": (
        _edit_yaml("k8s/kustomization.yaml", lambda d: d[0].update(resource=d[0].pop("resources"))),
        "unknown field 'resource'",
    ),
    "manifest missing from its kustomization": (
        _edit_yaml("k8s/kustomization.yaml", lambda d: d[0]["resources"].remove("flower.yaml")),
        "flower.yaml is in its directory but not listed",
    ),
    "secret file nobody documented": (
        _edit_yaml(
            "k8s/kustomization.yaml",
            lambda d: d[0]["secretGenerator"].append({"name": "x", "envs": ["secrets/x.env"]}),
        ),
        "secrets/x.env is not described",
    ),
    "patch of an object the base lacks": (
        _edit_yaml(
            "k8s-autoscaling/work-shutdown.yaml", lambda d: d[0]["metadata"].update(name="dmipro-worker")
        ),
        "which k8s-autoscaling does not define",
    ),
    "two autoscalers on one workload": (
        _edit_yaml("k8s-autoscaling/kustomization.yaml", lambda d: d[0]["patches"].pop(0)),
        "both scale ('Deployment', 'dmipro-work')",
    ),
}

PATCH_BROKEN: dict[str, tuple[Callable[[Path], Path], str]] = {
    "delete patch of an object the base lacks": (
        _edit_yaml(
            "k8s-autoscaling/drop-cpu-hpa.yaml", lambda d: d[0]["metadata"].update(name="dmipro-wrok")
        ),
        "patches ('HorizontalPodAutoscaler', 'dmipro-wrok'), which k8s-autoscaling does not define",
    ),
    "patch that makes the object invalid": (
        _edit_yaml(
            "k8s-autoscaling/work-shutdown.yaml",
            lambda d: d[0]["spec"]["template"]["spec"].update(terminationGracePeriodSeconds="5 min"),
        ),
        "terminationGracePeriodSeconds: '5 min' is not of type",
    ),
}

COMPOSE_BROKEN: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "misspelled service field": (
        lambda c: c["services"]["work"].update(comand=["x"]),
        "'comand' was unexpected",
    ),
    "ports not a list": (
        lambda c: c["services"]["flower"].update(ports="5555:5555"),
        "is not of type 'array'",
    ),
    "unknown top-level key": (lambda c: c.update(service={}), "'service' does not match any of the regexes"),
    "depends on a missing service": (
        lambda c: c["services"]["work"].update(depends_on={"rabbit": {"condition": "service_started"}}),
        "no service 'rabbit'",
    ),
    "undeclared network": (
        lambda c: c["services"]["redis"].update(networks=["frontend"]),
        "no network 'frontend'",
    ),
    "undeclared volume": (
        lambda c: c["services"]["redis"].update(volumes=["cache:/data"]),
        "no volume 'cache'",
    ),
}


@pytest.fixture
def deploy_copy(tmp_path: Path) -> Path:
    root = tmp_path / "deploy"
    shutil.copytree(DEPLOY, root)
    return root


def _all_problems(root: Path) -> Problems:
    out: Problems = []
    for path in manifest_files(root):
        out += manifest_problems(path, root)
    return out


def test_the_copy_is_clean_before_it_is_broken(deploy_copy: Path) -> None:
    assert _all_problems(deploy_copy) == []


@pytest.mark.parametrize("case", [*BROKEN, *PATCH_BROKEN])
def test_a_broken_manifest_is_rejected(case: str, deploy_copy: Path) -> None:
    breaker, expected = {**BROKEN, **PATCH_BROKEN}[case]
    breaker(deploy_copy)
    problems = _all_problems(deploy_copy)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("case", COMPOSE_BROKEN)
def test_a_broken_compose_file_is_rejected(case: str, tmp_path: Path) -> None:
    edit, expected = COMPOSE_BROKEN[case]
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    edit(doc)
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    problems = compose_problems(path)
    assert any(expected in p for p in problems), problems
