"""The Dockerfiles, read statically (CI has no Docker daemon): everything they copy exists and
passes their .dockerignore, they run as a non-root user, check health over grpc.health.v1, and
start `cortexlens serve` with the rendered container Serve config that they copy."""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

import pytest

from deploy import render

DOCKER = render.DEPLOY / "docker"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    ignored = False
    for p in patterns:
        neg = p.startswith("!")
        pat = p[1:] if neg else p
        pat = pat.rstrip("/")
        hit = fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat + "/*")
        if pat.startswith("**/"):
            hit = hit or fnmatch.fnmatch(Path(rel).name, pat[3:])
        if hit:
            ignored = not neg
    return ignored


def test_there_are_cpu_and_gpu_images():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.gpu"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(path):
    ins = _instructions(path)
    ignore = [
        ln.strip()
        for ln in (path.parent / (path.name + ".dockerignore")).read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    copied = []
    for op, rest in ins:
        if op == "COPY" and "--from" not in rest:
            *srcs, _dst = shlex.split(rest)
            for s in srcs:
                src = render.REPO / s
                assert src.exists(), f"{path.name}: COPY {s}: not in the repository"
                files = [src] if src.is_file() else [f for f in src.rglob("*") if f.is_file()]
                for f in files:
                    rel = str(f.relative_to(render.REPO))
                    if "__pycache__" in rel:
                        continue
                    assert not _ignored(rel, ignore), f"{path.name}: {rel} is .dockerignored"
                copied.append(s.rstrip("/"))
    # the Serve config the package reads, and the container's rendered one, are in the image
    assert "deploy/serve" in copied
    assert any("cortexlens.container.yaml" in c for c in copied)
    users = [rest for op, rest in ins if op == "USER"]
    assert users and not users[-1].startswith(("0", "root")), "must run as a non-root user"
    health = " ".join(rest for op, rest in ins if op == "HEALTHCHECK")
    assert "healthcheck.py" in health
    cmd = next(rest for op, rest in reversed(ins) if op == "CMD")
    assert "cortexlens" in cmd and "serve" in cmd
    assert str(render.CONTAINER_CONFIG.relative_to(render.REPO)) in cmd
    run = " ".join(rest for op, rest in ins if op == "RUN")
    assert 'pip install -e ".[${EXTRA}]"' in run
    if path.name.endswith("gpu"):
        assert "onnxruntime-gpu" in run and "tensorrt" in run
        assert "pip uninstall -y onnxruntime" in run
    else:
        assert "torch==${TORCH_VERSION}" in run and "whl/cpu" in " ".join(r for _, r in ins)
    assert "ARG EXTRA=retrain" in path.read_text(), "the cluster image runs retraining jobs"


def test_healthcheck_reports_unreachable_server():
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run(
        [sys.executable, str(DOCKER / "healthcheck.py"), f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "UNAVAILABLE" in r.stderr
