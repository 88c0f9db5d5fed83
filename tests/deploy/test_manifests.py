"""The deployment files: they parse, validate (kubernetes-validate for built-in kinds, KubeRay's CRD
schema for the RayService, a written schema for the ServiceMonitor), are what `deploy.render`
renders from the one Serve config (no drift between the cluster and `cortexlens serve`), and
every check fails on a deliberately broken copy.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from deploy import checks, render

VARIANT_FILES = [render.rayservice_path(v) for v in render.VARIANTS]


@pytest.fixture(scope="module")
def rendered():
    return render.render()


def _docs(path: Path) -> list[dict]:
    return checks.load_docs(path)


def _rayservice(path: Path) -> dict:
    return next(d for d in _docs(path) if d["kind"] == "RayService")


# -- the committed files ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path", checks.manifest_files(), ids=lambda p: str(p.relative_to(render.DEPLOY))
)
def test_every_manifest_parses(path):
    docs = checks.load_docs(path)
    assert docs, f"{path} is empty"


def test_rendered_files_are_committed_and_up_to_date(rendered):
    assert set(rendered) >= {*VARIANT_FILES, render.CONTAINER_CONFIG, render.DASHBOARD}
    bad = render.stale(rendered)
    assert not bad, "stale (run `python -m deploy.render`):\n" + "\n".join(bad.values())


def test_all_checks_pass_on_the_committed_files():
    assert checks.check() == []


def test_the_crd_schema_is_strict():
    v = checks.rayservice_validator()
    assert v.schema["additionalProperties"] is False
    spec = v.schema["properties"]["spec"]
    assert spec["additionalProperties"] is False
    assert "serveConfigV2" in spec["properties"]


@pytest.mark.parametrize("path", VARIANT_FILES, ids=lambda p: f"{p.parent.name}-variant")
def test_serve_config_is_the_local_one_modulo_listed_overrides(path):
    from service import server

    cfg = render.embedded_serve_config(_rayservice(path))
    base = yaml.safe_load(render.SERVE_CONFIG.read_text())
    assert render.unexpected_overrides(base, cfg) == []
    # the paths that do differ are exactly the overlay's, and every one is listed
    changed = set(render.diff_paths(base, cfg))
    assert changed, "the cluster must at least listen beyond loopback"
    assert "http_options.host" in changed
    assert f"{render.APP}.args.metrics_host" in changed
    # the local server's own loader takes it as is (ServiceSettings refuses unknown keys)
    tmp = server.load_config(render.SERVE_CONFIG)
    assert server.app_config(tmp)["import_path"] == server.app_config(cfg)["import_path"]
    assert cfg["grpc_options"] == base["grpc_options"]


def test_gpu_variant_asks_a_gpu_per_decoder_replica():
    rs = _rayservice(render.rayservice_path("gpu"))
    cfg = render.embedded_serve_config(rs)
    dec = next(d for d in render.app_config_of(cfg)["deployments"] if d["name"] == "DecoderModel")
    assert dec["ray_actor_options"]["num_gpus"] == 1
    assert dec["autoscaling_config"]["max_replicas"] >= dec["autoscaling_config"]["min_replicas"]
    assert render.app_args(cfg)["providers"][0] == "TensorrtExecutionProvider"
    workers = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    # enough GPU pods for the decoder's maximum, one replica per GPU
    assert sum(g["maxReplicas"] for g in workers) >= dec["autoscaling_config"]["max_replicas"]


def test_dashboard_covers_exactly_the_service_metrics():
    from prometheus_client import generate_latest

    from service.metrics import Metrics

    m = Metrics()
    m.frames_dropped.labels("duplicate").inc()
    m.predictions.labels("Decode").inc()
    m.requests.labels("Decode", "OK").inc()
    m.unit_active.labels("3").inc()
    m.set_model("default", "v0001", "x")
    exposed = {
        line.split("{")[0].split(" ")[0]
        for line in generate_latest(m.registry).decode().splitlines()
        if line and not line.startswith("#")
    }
    dash = json.loads(render.DASHBOARD.read_text())
    used = set()
    for p in dash["panels"]:
        for t in p["targets"]:
            used |= set(re.findall(r"cortexlens_[a-z_]+", t["expr"]))
    assert used <= exposed, (
        f"the dashboard queries metrics the service does not export: {used - exposed}"
    )
    families = {re.sub(r"_(bucket|sum|count|created|total)$", "", n) for n in exposed}
    shown = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in used}
    assert families - shown == set(), (
        f"service metrics missing from the dashboard: {families - shown}"
    )
    cm = next(d for d in _docs(render.MONITORING / "cortexlens.yaml") if d["kind"] == "ConfigMap")
    assert json.loads(cm["data"]["cortexlens.json"]) == dash


def test_container_config_runs_locally():
    from service import server

    cfg = server.load_config(render.CONTAINER_CONFIG)
    s = server.settings_of(cfg)
    assert s.home == "/var/lib/cortexlens" and s.metrics_host == "0.0.0.0"


def test_render_refuses_an_override_outside_the_list():
    with pytest.raises(ValueError, match="max_batch_size"):
        render.serve_config(
            {"applications": [{"name": "cortexlens", "args": {"max_batch_size": 64}}]}
        )
    with pytest.raises(ValueError, match="grpc_options.port"):
        render.serve_config({"grpc_options": {"port": 9001}})


def test_merge_rules():
    base = {"a": 1, "l": [{"name": "x", "v": 1}, {"name": "y", "v": 2}], "p": [1, 2]}
    out = render.merge(base, {"a": None, "l": [{"name": "y", "v": 3}, {"name": "z"}], "p": [3]})
    assert out == {"l": [{"name": "x", "v": 1}, {"name": "y", "v": 3}, {"name": "z"}], "p": [3]}
    assert base["a"] == 1  # not modified


# -- deliberately broken copies: each check must fail ---------------------------------------------
@pytest.fixture
def deploy_copy(tmp_path):
    """A copy of deploy/'s manifests; returns a function that writes a broken file and checks
    the whole set."""
    dst = tmp_path / "deploy"
    for p in checks.manifest_files():
        if checks._is_template(p) or p == render.SERVE_CONFIG:
            continue
        q = dst / p.relative_to(render.DEPLOY)
        q.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, q)

    def run(rel: str, mutate) -> list[str]:
        path = dst / rel
        docs = checks.load_docs(path)
        out = mutate(copy.deepcopy(docs))
        if isinstance(out, str):
            path.write_text(out)
        else:
            path.write_text(yaml.safe_dump_all(out if out is not None else docs, sort_keys=False))
        return checks.check(checks.manifest_files(dst))

    assert checks.check(checks.manifest_files(dst)) == []
    return run


CPU = "kuberay/cpu/cortexlens.yaml"


def _rs(docs):
    return next(d for d in docs if d["kind"] == "RayService")


def _kind(docs, kind):
    return next(d for d in docs if d["kind"] == kind)


def _set_serve(docs, fn):
    rs = _rs(docs)
    cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    fn(cfg)
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    return docs


def _app(cfg):
    return render.app_config_of(cfg)


BROKEN = {
    "yaml syntax": (
        CPU,
        lambda docs: "apiVersion: ray.io/v1\nkind: RayService\nspec: [\n",
        "parse",
    ),
    "RayService unknown field": (
        CPU,
        lambda docs: (_rs(docs)["spec"].__setitem__("serveConfigV3", "x"), docs)[1],
        "serveConfigV3",
    ),
    "RayService wrong type": (
        CPU,
        lambda docs: (
            _rs(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].__setitem__(
                "replicas", "two"
            ),
            docs,
        )[1],
        "replicas",
    ),
    "RayService missing required": (
        CPU,
        lambda docs: (
            _rs(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"),
            docs,
        )[1],
        "groupName",
    ),
    "pod template typo": (
        CPU,
        lambda docs: (
            _rs(docs)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
                "containers"
            ][0].__setitem__("imagePullPolicyy", "Always"),
            docs,
        )[1],
        "imagePullPolicyy",
    ),
    "Service port not a number": (
        CPU,
        lambda docs: (
            _kind(docs, "Service")["spec"]["ports"][0].__setitem__("port", "metrics"),
            docs,
        )[1],
        "Service cortexlens-metrics",
    ),
    "PVC unknown field": (
        CPU,
        lambda docs: (
            _kind(docs, "PersistentVolumeClaim")["spec"].__setitem__("size", "1Gi"),
            docs,
        )[1],
        "size",
    ),
    "ServiceMonitor bad interval": (
        "monitoring/cortexlens.yaml",
        lambda docs: (
            _kind(docs, "ServiceMonitor")["spec"]["endpoints"][0].__setitem__(
                "interval", "15 seconds"
            ),
            docs,
        )[1],
        "interval",
    ),
    "ServiceMonitor selects nothing": (
        "monitoring/cortexlens.yaml",
        lambda docs: (
            _kind(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"].__setitem__(
                "app.kubernetes.io/component", "metricz"
            ),
            docs,
        )[1],
        "selects no Service",
    ),
    "serve config drift: gRPC port": (
        CPU,
        lambda docs: _set_serve(docs, lambda c: c["grpc_options"].__setitem__("port", 9001)),
        "grpc_options.port",
    ),
    "serve config drift: app args": (
        CPU,
        lambda docs: _set_serve(docs, lambda c: _app(c)["args"].__setitem__("top_m", 4)),
        "args.top_m",
    ),
    "serve config drift: servicer dropped": (
        CPU,
        lambda docs: _set_serve(docs, lambda c: c["grpc_options"]["grpc_servicer_functions"].pop()),
        "grpc_servicer_functions",
    ),
    "serve config invalid setting": (
        CPU,
        lambda docs: _set_serve(docs, lambda c: _app(c)["args"].__setitem__("metrics_host", 5)),
        "invalid",
    ),
    "container port differs from the config": (
        CPU,
        lambda docs: (
            [
                p.__setitem__("containerPort", 9200)
                for p in _rs(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"][
                    "spec"
                ]["containers"][0]["ports"]
                if p["name"] == "cl-metrics"
            ],
            docs,
        )[1],
        "port cl-metrics is 9200",
    ),
    "unknown kind": (
        CPU,
        lambda docs: [*docs, {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {}}],
        "no check for this kind",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_a_broken_copy_fails(deploy_copy, case):
    rel, mutate, expect = BROKEN[case]
    errs = deploy_copy(rel, mutate)
    assert errs, f"{case}: no check failed"
    assert any(expect in e for e in errs), f"{case}: expected {expect!r} in {errs}"


def test_checks_cli_fails_on_a_broken_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    docs = _docs(render.rayservice_path("cpu"))
    _rs(docs)["spec"]["rayClusterConfig"]["rayVersion"] = 2
    bad.write_text(yaml.safe_dump_all(docs))
    assert checks.main([str(bad)]) == 1
    assert "rayVersion" in capsys.readouterr().out
    assert checks.main([str(render.rayservice_path("cpu"))]) == 0
