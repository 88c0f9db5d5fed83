"""Fixtures for the service integration tests: a real (small) model in a temporary home.

- ``sim512_recording`` (session): one simulated session, 512 cells at 30 Hz for 2 minutes with
  its drifting-grating trials (``service.home.simulated_recording``, seed 0), session id
  ``"sim512"``, unit ids ``"sim512/cell0000"`` ... ``"sim512/cell0511"``: the size of a
  closed-loop stream the service must keep up with.
- ``service_recordings`` (session): the 5 shipped Park sessions (``park_recordings``, from
  ``tests/conftest.py``) followed by ``sim512_recording``: every session the model knows.
- ``service_home`` (session): a temporary home directory (the layout of ``service.home``)
  whose registry holds model ``"default"``: a ``quick_bundle`` (small decoder + SAE, ONNX with
  top-16 ablation attributions, units with empty labels, seed 0) trained on
  ``service_recordings``, published as ``v0001`` and promoted. Built once per test session in
  ~25 s on 2 cores. A namespace with:

    ``home``          the home directory (``Path``); pass it explicitly, or use
                      ``service_home_env`` to point ``$CORTEXLENS_HOME`` at it
    ``registry``      the ``models.registry.Registry`` (``registry.root`` is its directory)
    ``registry_dir``  ``home / "registry"``
    ``sessions_dir``  ``home / "sessions"`` (not created)
    ``name``          ``"default"``
    ``version``       ``"v0001"``
    ``bundle``        the opened, verified ``models.bundle.Bundle`` of that version
    ``bundle_path``   its directory inside the registry
    ``recordings``    ``service_recordings``

  Treat it as read-only: it is shared by every test of the session. To change the registry
  (promote, roll back, publish), make a fresh home and ``registry.publish(service_home.bundle_path,
  "default", promote=True)`` into it.
- ``service_home_env`` (function): sets ``$CORTEXLENS_HOME`` to ``service_home.home`` for one
  test (so ``service.home.home_dir()`` and ``ensure_default_model()`` find it) and returns the
  namespace.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers in tests bind loopback only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def published_home(service_home, tmp_path_factory, name: str):
    """A fresh home whose registry holds the ``service_home`` bundle as the promoted version of
    ``default``: (home, registry, version)."""
    from models.registry import Registry

    home = tmp_path_factory.mktemp(name)
    reg = Registry(home / "registry")
    return home, reg, reg.publish(service_home.bundle_path, "default", promote=True)


@pytest.fixture(scope="session")
def sim512_recording():
    from service.home import simulated_recording

    return simulated_recording("sim512", n_cells=512, frame_rate=30.0, minutes=2.0, seed=0)


@pytest.fixture(scope="session")
def service_recordings(park_recordings, sim512_recording):
    return [*park_recordings, sim512_recording]


@pytest.fixture(scope="session")
def service_home(tmp_path_factory, service_recordings):
    from models.registry import Registry
    from service.home import DEFAULT_MODEL, quick_bundle, registry_dir, sessions_dir

    root = tmp_path_factory.mktemp("service_home")
    home = root / "home"
    built = quick_bundle(service_recordings, root / "quick", seed=0, name=DEFAULT_MODEL)
    reg = Registry(registry_dir(home))
    version = reg.publish(built.path, DEFAULT_MODEL, promote=True)
    bundle = reg.open(DEFAULT_MODEL, version)
    return SimpleNamespace(
        home=home,
        registry=reg,
        registry_dir=reg.root,
        sessions_dir=sessions_dir(home),
        name=DEFAULT_MODEL,
        version=version,
        bundle=bundle,
        bundle_path=bundle.path,
        recordings=list(service_recordings),
    )


@pytest.fixture
def service_home_env(service_home, monkeypatch):
    from service.home import HOME_ENV

    monkeypatch.setenv(HOME_ENV, str(service_home.home))
    return service_home
