"""The Serve config file and `service.server`'s config helpers (no Ray started here).

`load_config` reads ``deploy/serve/cortexlens.yaml``, applies overrides and validates the
application's ``args`` as `ServiceSettings`; `set_model` makes the hot-swap copy; the names the
file points at (servicer functions, ``import_path``) must import.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import yaml
from pydantic import ValidationError

from service import server
from service.settings import APP_NAME, SERVE_CONFIG, IngestSettings, ServiceSettings


@pytest.fixture(scope="module")
def raw_yaml() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def _raw_app(raw: dict) -> dict:
    (app,) = [a for a in raw["applications"] if a["name"] == APP_NAME]
    return app


def test_shipped_config_loads_and_validates(raw_yaml):
    cfg = server.load_config()
    s = server.settings_of(cfg)
    assert isinstance(s, ServiceSettings) and isinstance(s.ingest, IngestSettings)
    # every value the file sets is what the settings hold (nested ingest args included)
    raw_args = _raw_app(raw_yaml)["args"]
    for k, v in raw_args.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                assert getattr(getattr(s, k), kk) == vv, f"{k}.{kk}"
        else:
            assert getattr(s, k) == v, k
    # the args come back complete (defaults filled) and JSON-plain, ready for the Serve controller
    args = server.app_config(cfg)["args"]
    assert set(args) == set(ServiceSettings.model_fields)
    assert set(args["ingest"]) == set(IngestSettings.model_fields)
    assert args == ServiceSettings.model_validate(args).model_dump(mode="json")
    # the rest of the file is untouched
    assert cfg["grpc_options"] == raw_yaml["grpc_options"]
    assert cfg["http_options"] == raw_yaml["http_options"]
    assert server.app_config(cfg)["import_path"] == _raw_app(raw_yaml)["import_path"]


def test_load_config_port_overrides(raw_yaml):
    cfg = server.load_config(grpc_port=19001, http_port=18001)
    assert cfg["grpc_options"]["port"] == 19001
    assert cfg["http_options"]["port"] == 18001
    # other options kept
    assert (
        cfg["grpc_options"]["grpc_servicer_functions"]
        == (raw_yaml["grpc_options"]["grpc_servicer_functions"])
    )
    assert cfg["http_options"]["host"] == raw_yaml["http_options"]["host"]
    # no override: the file's ports
    cfg = server.load_config()
    assert cfg["grpc_options"]["port"] == raw_yaml["grpc_options"]["port"]
    assert cfg["http_options"]["port"] == raw_yaml["http_options"]["port"]


def test_load_config_args_merge_nested_ingest(raw_yaml):
    raw_args = _raw_app(raw_yaml)["args"]
    raw_ingest = raw_args["ingest"]
    assert "max_gap_frames" not in raw_ingest  # the override below adds a key the file lacks
    cfg = server.load_config(
        args={"home": "/tmp/x-home", "metrics_port": 0, "ingest": {"max_gap_frames": 60}}
    )
    s = server.settings_of(cfg)
    assert s.home == "/tmp/x-home" and s.metrics_port == 0
    assert s.ingest.max_gap_frames == 60
    # the file's nested ingest keys survive the merge, and its top-level args too
    for k, v in raw_ingest.items():
        assert getattr(s.ingest, k) == v, k
    assert s.model == raw_args["model"] and s.top_m == raw_args["top_m"]
    # overriding a nested key the file sets replaces just that key
    flipped = not raw_ingest["record_sync"]
    s = server.settings_of(server.load_config(args={"ingest": {"record_sync": flipped}}))
    assert s.ingest.record_sync is flipped
    assert s.ingest.decode_stride == raw_ingest["decode_stride"]


def test_load_config_nested_override_keeps_non_default_file_values(tmp_path, raw_yaml):
    """A nested override replaces only its keys: the file's other ingest values (here set away
    from the defaults, so a lost value would show) are kept."""
    cfg = copy.deepcopy(raw_yaml)
    d = IngestSettings()
    file_ingest = {
        "decode_stride": d.decode_stride + 2,
        "reorder_frames": d.reorder_frames + 5,
        "backpressure": "refuse" if d.backpressure == "coalesce" else "coalesce",
        "record_sync": not d.record_sync,
    }
    _raw_app(cfg)["args"] = {"top_m": 4, "ingest": file_ingest}
    p = tmp_path / "custom.yaml"
    p.write_text(yaml.safe_dump(cfg))
    s = server.settings_of(
        server.load_config(p, args={"max_sessions": 3, "ingest": {"max_gap_frames": 61}})
    )
    assert s.top_m == 4 and s.max_sessions == 3
    assert s.ingest.max_gap_frames == 61
    for k, v in file_ingest.items():
        assert getattr(s.ingest, k) == v, k
    # a non-dict override of a dict replaces it whole (and is validated)
    with pytest.raises(ValidationError):
        server.load_config(p, args={"ingest": "fast"})


def test_load_config_does_not_leak_between_calls():
    a = server.load_config(grpc_port=19002, args={"top_m": 3, "ingest": {"max_gap_frames": 7}})
    b = server.load_config()
    sa, sb = server.settings_of(a), server.settings_of(b)
    assert (sa.top_m, sa.ingest.max_gap_frames) == (3, 7)
    assert sb.ingest.max_gap_frames == IngestSettings().max_gap_frames  # the file does not set it
    assert b == server.load_config()
    assert b["grpc_options"]["port"] != 19002


@pytest.mark.parametrize(
    "args",
    [
        {"bogus": 1},
        {"topm": 8},  # a typo of top_m
        {"ingest": {"bogus": 1}},
        {"ingest": {"backpressure": "drop"}},
        {"top_m": 0},
        {"max_batch_size": -1},
    ],
)
def test_load_config_refuses_bad_args(args):
    with pytest.raises(ValidationError):
        server.load_config(args=args)


def test_load_config_validates_the_file_itself(tmp_path, raw_yaml):
    bad = copy.deepcopy(raw_yaml)
    _raw_app(bad)["args"]["mdoel"] = "default"  # a typo in the file
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValidationError, match="mdoel"):
        server.load_config(p)
    # a file whose args are fine loads from any path
    good = copy.deepcopy(raw_yaml)
    _raw_app(good)["args"] = {"top_m": 5}
    p.write_text(yaml.safe_dump(good))
    assert server.settings_of(server.load_config(p)).top_m == 5


def test_config_without_the_application_is_refused(tmp_path, raw_yaml):
    other = copy.deepcopy(raw_yaml)
    _raw_app(other)["name"] = "something-else"
    p = tmp_path / "other.yaml"
    p.write_text(yaml.safe_dump(other))
    with pytest.raises(ValueError, match=APP_NAME):
        server.load_config(p)


def test_set_model_sets_user_config_on_decoder_model():
    cfg = server.load_config()
    before = copy.deepcopy(cfg)
    out = server.set_model(cfg, model="other", version="v0042", bundle="/b/x")
    assert cfg == before  # a copy; the input is not changed
    deps = {d["name"]: d for d in server.app_config(out)["deployments"]}
    assert deps["DecoderModel"]["user_config"] == {
        "model": "other",
        "version": "v0042",
        "bundle": "/b/x",
    }
    # the other deployment and the decoder's other options are left as they were
    before_deps = {d["name"]: d for d in server.app_config(before)["deployments"]}
    assert deps["Ingress"] == before_deps["Ingress"]
    for k, v in before_deps["DecoderModel"].items():
        if k != "user_config":
            assert deps["DecoderModel"][k] == v
    assert len(server.app_config(out)["deployments"]) == len(before_deps)
    # setting it again replaces, never duplicates
    again = server.set_model(out, version="v0043")
    (dec,) = [d for d in server.app_config(again)["deployments"] if d["name"] == "DecoderModel"]
    assert dec["user_config"] == {"model": "", "version": "v0043", "bundle": ""}


def test_set_model_adds_decoder_model_when_missing():
    cfg = server.load_config()
    app = server.app_config(cfg)
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "DecoderModel"]
    out = server.set_model(cfg, version="v0002")
    (dec,) = [d for d in server.app_config(out)["deployments"] if d["name"] == "DecoderModel"]
    assert dec["user_config"] == {"model": "", "version": "v0002", "bundle": ""}
    assert all(d["name"] != "DecoderModel" for d in server.app_config(cfg)["deployments"])


def _resolve_dotted(path: str):
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_grpc_servicer_functions_import(raw_yaml):
    funcs = raw_yaml["grpc_options"]["grpc_servicer_functions"]
    assert any(f.endswith("add_DecoderServicer_to_server") for f in funcs)
    for f in funcs:
        fn = _resolve_dotted(f)
        assert callable(fn), f


def test_import_path_resolves_to_build_app(raw_yaml):
    import_path = _raw_app(raw_yaml)["import_path"]
    assert import_path == "service.app:build_app"
    module, _, attr = import_path.partition(":")
    fn = getattr(importlib.import_module(module), attr)
    assert callable(fn)
    from service.app import build_app

    assert fn is build_app


def test_loaded_config_is_a_valid_serve_schema():
    from ray.serve.schema import ServeDeploySchema

    cfg = server.load_config(grpc_port=19003, args={"ingest": {"max_gap_frames": 60}})
    schema = ServeDeploySchema.model_validate(cfg)
    (app,) = [a for a in schema.applications if a.name == APP_NAME]
    assert app.import_path == "service.app:build_app"
    assert app.args["ingest"]["max_gap_frames"] == 60
    assert schema.grpc_options.port == 19003


def test_settings_paths(tmp_path, monkeypatch):
    s = ServiceSettings(home=str(tmp_path))
    assert s.resolved_home() == tmp_path
    assert s.registry_dir() == tmp_path / "registry"
    assert s.records_dir() == tmp_path / "sessions"
    assert ServiceSettings(home=str(tmp_path), records="/r").records_dir().as_posix() == "/r"
    monkeypatch.setenv("CL_TEST_TOKEN", "s3cret")
    assert ServiceSettings(token="inline").bearer_token() == "inline"
    assert ServiceSettings(token="inline", token_env="CL_TEST_TOKEN").bearer_token() == "s3cret"
