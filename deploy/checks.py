"""Offline checks of the deployment files (run by ``tests/deploy`` in CI, or by hand):

    python -m deploy.checks                 # every manifest under deploy/
    python -m deploy.checks FILE [FILE...]  # just these (e.g. a manifest you edited)

- every ``*.yaml`` / ``*.json`` under ``deploy/`` parses;
- built-in kinds (Service, ConfigMap, PersistentVolumeClaim, and the pod templates and the
  ``serveService`` inside the RayService, checked as a Pod and a Service) validate with
  kubernetes-validate, strictly (an unknown field is an error), at :data:`K8S_VERSION`;
- a RayService validates against the ``openAPIV3Schema`` of KubeRay's CRD
  (``../shared/schemas/kuberay/ray.io_rayservices.yaml``), made strict the way
  ``kubectl apply --validate=strict`` is: an unknown field is an error (``additionalProperties:
  false`` wherever the CRD lists properties and does not preserve unknown fields). The CRD's CEL
  rules (``x-kubernetes-validations``: immutability and the managedBy enum) are not evaluated;
- a ServiceMonitor validates against ``deploy/schemas/servicemonitor.schema.json``, a strict
  subset of the prometheus-operator's ServiceMonitor (monitoring.coreos.com/v1) written from its
  API reference (the operator's CRD is not vendored here);
- a RayService's ``serveConfigV2`` is the Serve config that ``cortexlens serve`` runs, differing
  only where ``deploy.render.SERVE_OVERRIDES`` allows, and valid for Serve and ServiceSettings;
  the ports of the Services and containers are the ports that config opens;
- the ServiceMonitor selects the metrics Service, whose ports exist on the worker pods.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from deploy import render

K8S_VERSION = "1.33.0"
CRD = render.REPO.parent / "shared" / "schemas" / "kuberay" / "ray.io_rayservices.yaml"
SERVICEMONITOR_SCHEMA = render.DEPLOY / "schemas" / "servicemonitor.schema.json"
BUILTIN_GROUPS = ("v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1")


def manifest_files(root: Path = render.DEPLOY) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix in (".yaml", ".yml", ".json") and p.is_file() and "__pycache__" not in p.parts
    )


def load_docs(path: Path) -> list[Any]:
    """The documents of a YAML or JSON file (raises on a syntax error)."""
    text = path.read_text()
    if path.suffix == ".json":
        return [json.loads(text)]
    return [d for d in yaml.safe_load_all(text) if d is not None]


# -- schemas ---------------------------------------------------------------------------------------
def strict_openapi(schema: Any) -> Any:
    """A Kubernetes structural schema as a JSON Schema that refuses unknown fields."""
    if isinstance(schema, list):
        return [strict_openapi(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_openapi(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def rayservice_validator():
    import jsonschema

    crd = yaml.safe_load(CRD.read_text())
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    schema = strict_openapi(versions["v1"]["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@functools.cache
def servicemonitor_validator():
    import jsonschema

    schema = json.loads(SERVICEMONITOR_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _schema_errors(validator, doc: dict, what: str) -> list[str]:
    out = []
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in e.absolute_path) or "(top)"
        out.append(f"{what}: {where}: {e.message}")
    return out


def builtin_errors(doc: dict, what: str = "") -> list[str]:
    import kubernetes_validate

    what = what or f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top)"
        return [f"{what}: {where}: {e.message}"]
    except Exception as e:  # noqa: BLE001 - unknown kind / version
        return [f"{what}: cannot validate: {type(e).__name__}: {e}"]
    return []


# -- the RayService --------------------------------------------------------------------------------
def _pod_templates(rs: dict) -> list[tuple[str, dict]]:
    rc = rs.get("spec", {}).get("rayClusterConfig", {})
    out = [("head", rc.get("headGroupSpec", {}).get("template", {}))]
    for g in rc.get("workerGroupSpecs", []) or []:
        out.append((f"worker group {g.get('groupName')}", g.get("template", {})))
    return out


def rayservice_errors(rs: dict) -> list[str]:
    """CRD schema, embedded built-in objects, and the embedded Serve config."""
    name = f"RayService {rs.get('metadata', {}).get('name')}"
    errs = _schema_errors(rayservice_validator(), rs, name)
    spec = rs.get("spec") or {}
    for label, tpl in _pod_templates(rs):
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": tpl.get("metadata") or {"name": "x"},
            "spec": tpl.get("spec"),
        }
        errs += builtin_errors(pod, f"{name} {label} pod template")
    if "serveService" in spec:
        svc = {"apiVersion": "v1", "kind": "Service", **spec["serveService"]}
        errs += builtin_errors(svc, f"{name} serveService")
    errs += serve_config_errors(rs)
    return errs


def serve_config_errors(rs: dict) -> list[str]:
    """The embedded Serve config is deploy/serve/cortexlens.yaml modulo SERVE_OVERRIDES, valid,
    and the ports the manifests expose are the ones it opens."""
    name = f"RayService {rs.get('metadata', {}).get('name')} serveConfigV2"
    try:
        cfg = render.embedded_serve_config(rs)
        assert isinstance(cfg, dict), "not a mapping"
    except Exception as e:  # noqa: BLE001
        return [f"{name}: does not parse: {e}"]
    errs = config_drift_errors(cfg, name)
    try:
        ports = render.ports_of(cfg)
    except Exception as e:  # noqa: BLE001
        return [*errs, f"{name}: no ports: {e}"]
    for p in (rs["spec"].get("serveService") or {}).get("spec", {}).get("ports", []):
        want = ports.get(p.get("name"))
        if want is not None and (p.get("port"), p.get("targetPort")) != (want, want):
            errs.append(f"{name}: serveService port {p.get('name')} is not {want}")
    for label, tpl in _pod_templates(rs):
        for c in (tpl.get("spec") or {}).get("containers", []):
            for p in c.get("ports", []):
                want = ports.get(p.get("name"))
                if want is not None and p.get("containerPort") != want:
                    errs.append(
                        f"{name}: {label} container {c.get('name')} port {p.get('name')} is "
                        f"{p.get('containerPort')}, the Serve config opens {want}"
                    )
    return errs


def config_drift_errors(cfg: dict, name: str) -> list[str]:
    base = yaml.safe_load(render.SERVE_CONFIG.read_text())
    errs = [
        f"{name}: {p} differs from {render.rel(render.SERVE_CONFIG)} (not an allowed override)"
        for p in render.unexpected_overrides(base, cfg)
    ]
    try:
        render.validate_serve_config(cfg)
    except Exception as e:  # noqa: BLE001
        errs.append(f"{name}: invalid: {e}")
    return errs


# -- cross references ------------------------------------------------------------------------------
def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def wiring_errors(docs: list[dict]) -> list[str]:
    """ServiceMonitor -> metrics Service -> worker pods: labels and port names line up."""
    errs = []
    services = [d for d in docs if d.get("kind") == "Service"]
    monitors = [d for d in docs if d.get("kind") == "ServiceMonitor"]
    rayservices = [d for d in docs if d.get("kind") == "RayService"]
    for m in monitors:
        sel = m.get("spec", {}).get("selector", {}).get("matchLabels", {})
        hit = [s for s in services if _selects(sel, s.get("metadata", {}).get("labels", {}))]
        if not hit:
            errs.append(f"ServiceMonitor {m['metadata']['name']}: selects no Service")
        for s in hit:
            names = {p.get("name") for p in s["spec"].get("ports", [])}
            for ep in m["spec"].get("endpoints", []):
                if ep.get("port") not in names:
                    errs.append(
                        f"ServiceMonitor {m['metadata']['name']}: port {ep.get('port')!r} is not "
                        f"a port of Service {s['metadata']['name']}"
                    )
    for s in services:
        for rs in rayservices:
            for label, tpl in _pod_templates(rs):
                if "worker" not in label:
                    continue
                labels = (tpl.get("metadata") or {}).get("labels", {})
                if not _selects(s.get("spec", {}).get("selector"), labels):
                    errs.append(f"Service {s['metadata']['name']}: does not select the {label}")
                    continue
                have = {
                    p.get("name") for c in tpl["spec"]["containers"] for p in c.get("ports", [])
                }
                for p in s["spec"].get("ports", []):
                    t = p.get("targetPort")
                    if isinstance(t, str) and t not in have:
                        errs.append(
                            f"Service {s['metadata']['name']}: targetPort {t!r} is not a port of "
                            f"the {label}"
                        )
    return errs


# -- files -----------------------------------------------------------------------------------------
def doc_errors(doc: Any, where: str) -> list[str]:
    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
        return []  # not a Kubernetes object (Serve config, overlay, dashboard JSON)
    kind, api = doc["kind"], doc["apiVersion"]
    if kind == "RayService":
        errs = rayservice_errors(doc)
    elif kind == "ServiceMonitor":
        errs = _schema_errors(servicemonitor_validator(), doc, f"ServiceMonitor {where}")
    elif api in BUILTIN_GROUPS:
        errs = builtin_errors(doc)
    else:
        errs = [f"{kind} ({api}): no check for this kind; add one to deploy/checks.py"]
    return [f"{where}: {e}" for e in errs]


def _is_template(path: Path) -> bool:
    return path == render.BASE or path.parent.name == "overlays"


def file_errors(path: Path) -> tuple[list[str], list[dict]]:
    """Errors of one file, and its Kubernetes objects."""
    try:
        docs = load_docs(path)
    except Exception as e:  # noqa: BLE001
        return [f"{path}: does not parse: {e}"], []
    if _is_template(path):  # inputs of deploy.render, checked through what it renders
        return [], []
    if path.name.endswith((".container.yaml",)) or path == render.SERVE_CONFIG:
        errs = config_drift_errors(docs[0], str(path)) if docs else [f"{path}: empty"]
        return errs, []
    errs: list[str] = []
    objs = []
    for i, d in enumerate(docs):
        errs += doc_errors(d, f"{path} [doc {i}]")
        if isinstance(d, dict) and "kind" in d:
            objs.append(d)
    return errs, objs


def check(paths: list[Path] | None = None) -> list[str]:
    """Every error of the given files (default: every manifest under deploy/)."""
    errs: list[str] = []
    objs: list[dict] = []
    for p in paths or manifest_files():
        e, o = file_errors(p)
        errs += e
        objs += o
    return errs + wiring_errors(objs)


def main(argv: list[str] | None = None) -> int:
    paths = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    errs = check(paths or None)
    for e in errs:
        print(e)
    print(f"{len(errs)} error(s)" if errs else "deploy manifests OK")
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main())
