"""Retraining jobs: what a job asks for (`JobSpec`), the promotion rules (`GateConfig`) and the
durable job state (`JobStore`).

A job record is one JSON file, ``<home>/jobs/<job_id>.json``, replaced atomically on every
change (temporary file in the same directory, ``fsync``, ``os.replace``, ``fsync`` of the
directory), so a reader or a restarted actor sees either the old or the new record, never half
of one. Fields::

    job_id, spec (JobSpec as JSON), state (QUEUED | RUNNING | SUCCEEDED | FAILED | CANCELLED),
    progress (0..1), message, created_at, started_at, finished_at (UTC ISO-8601 or null),
    parent_version, candidate_version, promoted (bool), decision (gate text with the numbers),
    result (dict; see `service.retrain.run.run_job`), error (traceback tail of a failed job)

After a restart (`JobStore.recover`), jobs that were QUEUED or RUNNING are marked FAILED with the
message ``interrupted by a restart of the retraining actor``; they are not re-queued, because a
job that was half-way may already have published a candidate version, and re-running it silently
would publish another one. The caller starts a new job with the same spec if it wants it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from models.config import Config

JobState = Literal["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
STATES: tuple[str, ...] = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
ACTIVE_STATES: tuple[str, ...] = ("QUEUED", "RUNNING")
TERMINAL_STATES: tuple[str, ...] = ("SUCCEEDED", "FAILED", "CANCELLED")
JobKind = Literal["adapt", "sae_refit", "finetune"]
INTERRUPTED_MESSAGE = "interrupted by a restart of the retraining actor"

_JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class GateConfig(Config):
    """Promotion rules: the candidate is promoted only if every rule holds (printed in every
    result). Accuracies are trial-level, on the held-out trials of the job's sessions."""

    min_accuracy_delta: float = Field(
        0.0, description="per listed task: candidate accuracy >= serving accuracy + this"
    )
    tasks: list[str] = Field(
        default_factory=lambda: ["direction"], description="tasks the accuracy rule applies to"
    )
    min_over_chance: float | None = Field(
        None,
        description="if set, per listed task also: candidate accuracy >= chance (1 / classes) + "
        "this (a serving version that cannot decode a new session scores 0, so the delta rule "
        "alone would pass a candidate at chance)",
    )
    max_fvu: float = Field(0.2, gt=0, description="SAE: fraction of variance unexplained <= this")
    max_dead_fraction: float = Field(0.5, ge=0, le=1, description="SAE: dead units <= this")


class JobSpec(Config):
    """One retraining job."""

    kind: JobKind
    session_ids: list[str] = Field(min_length=1, description="recorded sessions to train on")
    model: str = Field("default", description="registry model name")
    workers: int = Field(2, ge=1, description="Ray Train workers (finetune; >1: TorchTrainer)")
    epochs: int | None = Field(None, ge=1, description="None: the kind's default")
    seed: int = 0
    promote: bool = Field(True, description="promote the candidate if the gates pass")
    gates: GateConfig = Field(default_factory=GateConfig)


class JobCancelled(Exception):
    """Raised by `run_job` between steps when the job was cancelled."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_durable(path: Path, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON: tmp file + fsync + os.replace + fsync(dir)."""
    data = (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class JobStore:
    """Durable job records under ``root`` (normally ``<home>/jobs``), one JSON file per job.

    Thread-safe within a process (one lock around read-modify-write); meant to have one writer
    process (the retraining actor). Unknown job ids raise ``KeyError``.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        for stale in self.root.glob(".*.tmp"):  # left by a process killed mid-write
            with contextlib.suppress(OSError):
                stale.unlink()

    def _path(self, job_id: str) -> Path:
        if not isinstance(job_id, str) or not _JOB_ID_RE.match(job_id):
            raise KeyError(f"invalid job id {job_id!r}")
        return self.root / f"{job_id}.json"

    def work_dir(self, job_id: str) -> Path:
        """A scratch directory for the job's intermediate files (``<root>/<job_id>.work``)."""
        return self.root / f"{self._path(job_id).stem}.work"

    def create(self, spec: JobSpec, *, job_id: str | None = None) -> dict:
        """A new QUEUED job for ``spec``; returns its record."""
        if not isinstance(spec, JobSpec):
            spec = JobSpec.model_validate(spec)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        job_id = job_id or f"{stamp}-{spec.kind}-{uuid.uuid4().hex[:6]}"
        path = self._path(job_id)
        record = {
            "job_id": job_id,
            "spec": spec.to_dict(),
            "state": "QUEUED",
            "progress": 0.0,
            "message": "queued",
            "created_at": _now(),
            "started_at": None,
            "finished_at": None,
            "parent_version": None,
            "candidate_version": None,
            "promoted": False,
            "decision": "",
            "result": {},
            "error": None,
        }
        with self._lock:
            if path.exists():
                raise ValueError(f"job {job_id} already exists")
            write_json_durable(path, record)
        return record

    def get(self, job_id: str) -> dict:
        path = self._path(job_id)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise KeyError(f"no job {job_id!r} in {self.root}") from None

    def list(self) -> list[dict]:
        """Every job, oldest first (by creation time, then id)."""
        out = []
        for p in self.root.glob("*.json"):
            with contextlib.suppress(OSError, json.JSONDecodeError):
                out.append(json.loads(p.read_text()))
        return sorted(out, key=lambda r: (r.get("created_at") or "", r.get("job_id", "")))

    def update(self, job_id: str, **fields: Any) -> dict:
        """Change fields of a job record (atomically); returns the new record. Setting
        ``state`` to RUNNING stamps ``started_at``, to a terminal state ``finished_at``."""
        unknown = set(fields) - {
            "state",
            "progress",
            "message",
            "started_at",
            "finished_at",
            "parent_version",
            "candidate_version",
            "promoted",
            "decision",
            "result",
            "error",
        }
        if unknown:
            raise ValueError(f"unknown job record fields: {sorted(unknown)}")
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown job state {fields['state']!r} (one of {', '.join(STATES)})")
        with self._lock:
            record = self.get(job_id)
            record.update(fields)
            state = fields.get("state")
            if state == "RUNNING" and not record.get("started_at"):
                record["started_at"] = _now()
            if state in TERMINAL_STATES and "finished_at" not in fields:
                record["finished_at"] = _now()
            if "progress" in fields:
                record["progress"] = float(min(max(float(fields["progress"]), 0.0), 1.0))
            write_json_durable(self._path(job_id), record)
            return record

    def recover(self) -> list[str]:
        """After a restart: mark jobs left QUEUED or RUNNING as FAILED (see the module
        docstring: they are not re-queued); return their ids."""
        out = []
        with self._lock:
            for rec in self.list():
                if rec.get("state") in ACTIVE_STATES:
                    self.update(
                        rec["job_id"],
                        state="FAILED",
                        message=INTERRUPTED_MESSAGE,
                        error=f"{INTERRUPTED_MESSAGE} (was {rec.get('state')} at "
                        f"progress {rec.get('progress', 0.0):.2f}: {rec.get('message', '')})",
                    )
                    out.append(rec["job_id"])
        return out


__all__ = [
    "ACTIVE_STATES",
    "INTERRUPTED_MESSAGE",
    "STATES",
    "TERMINAL_STATES",
    "GateConfig",
    "JobCancelled",
    "JobKind",
    "JobSpec",
    "JobState",
    "JobStore",
    "write_json_durable",
]
