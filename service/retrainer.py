"""The retraining actor: batch jobs on recorded sessions, beside serving, one at a time.

`Retrainer` is a plain object (jobs run in a worker thread; `service.retrain.run_job` does the
work, with Ray Train when a fine-tune spans workers); `RetrainerActor` is the detached, named Ray
actor the gRPC ingress talks to (``cortexlens-retrainer``; restarted by Ray if its process dies).
Job state lives in ``<home>/jobs/<job_id>.json`` (`service.retrain.JobStore`), so it survives a
restart of the actor. A promoted candidate becomes the registry's current version, which the
decoder replicas follow (`DecoderModel` swaps in place); rollback is one registry call.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

from service.ingest import IngestError
from service.settings import NAMESPACE, ServiceSettings

log = logging.getLogger("cortexlens.retrainer")

ACTOR_NAME = "cortexlens-retrainer"
KINDS = ("adapt", "sae_refit", "finetune")
FINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


class Retrainer:
    def __init__(self, settings: dict | ServiceSettings):
        from service.retrain import JobStore

        s = settings if isinstance(settings, ServiceSettings) else ServiceSettings(**settings)
        self.settings = s
        self.home = Path(s.resolved_home())
        self.store = JobStore(self.home / "jobs")
        self.recovered = self.store.recover()
        self._cancel: dict[str, threading.Event] = {}
        self._queue: queue.Queue[str] = queue.Queue()
        for job in self.store.list():  # re-queued jobs (if the store re-queues on recovery)
            if job["state"] == "QUEUED":
                self._cancel[job["job_id"]] = threading.Event()
                self._queue.put(job["job_id"])
        threading.Thread(target=self._worker, daemon=True, name="retrain-worker").start()

    # -- control ----------------------------------------------------------------------------------
    def start(self, request: dict) -> dict:
        from pydantic import ValidationError

        from service.retrain import JobSpec

        kind = request.get("kind", "")
        if kind not in KINDS:
            raise IngestError(
                "INVALID_ARGUMENT", f"job kind {kind!r} is not one of {', '.join(KINDS)}"
            )
        sessions = list(request.get("session_ids") or [])
        if not sessions:
            raise IngestError("INVALID_ARGUMENT", "name the recorded sessions to train on")
        from service.ingest import session_dir

        for sid in sessions:
            d = session_dir(self.settings.records_dir(), sid)
            if not (d / "meta.json").is_file():
                raise IngestError("NOT_FOUND", f"no recorded session {sid!r} on this server")
        spec = {k: v for k, v in request.items() if v is not None}
        if "min_accuracy_delta" in spec:
            spec["gates"] = {"min_accuracy_delta": spec.pop("min_accuracy_delta")}
        spec.setdefault("model", self.settings.model)
        try:
            job = self.store.create(JobSpec.model_validate(spec))
        except ValidationError as e:
            raise IngestError("INVALID_ARGUMENT", f"bad job request: {e}") from None
        self._cancel[job["job_id"]] = threading.Event()
        self._queue.put(job["job_id"])
        return job

    def get(self, job_id: str) -> dict:
        try:
            return self.store.get(job_id)
        except (KeyError, FileNotFoundError):
            raise IngestError("NOT_FOUND", f"no job {job_id!r}") from None

    def list(self) -> list[dict]:
        return self.store.list()

    def cancel(self, job_id: str) -> dict:
        job = self.get(job_id)
        if job["state"] in FINAL:
            return job
        ev = self._cancel.setdefault(job_id, threading.Event())
        ev.set()
        if job["state"] == "QUEUED":
            return self.store.update(job_id, state="CANCELLED", message="cancelled before start")
        return self.store.update(job_id, message="cancelling ...")

    def rollback(self, model: str = "", version: str = "") -> str:
        from models.registry import Registry, RegistryError

        reg = Registry(self.settings.registry_dir(), create=False)
        name = model or self.settings.model
        try:
            return reg.rollback(name, to=version or None, reason="rollback over gRPC")
        except RegistryError as e:
            raise IngestError("FAILED_PRECONDITION", str(e)) from None

    def current(self, model: str = "") -> str | None:
        from models.registry import Registry

        return Registry(self.settings.registry_dir()).current(model or self.settings.model)

    # -- the worker -------------------------------------------------------------------------------
    def _worker(self) -> None:
        from service.retrain import execute_job

        while True:
            job_id = self._queue.get()
            if self.store.get(job_id)["state"] != "QUEUED":
                continue  # cancelled while queued
            ev = self._cancel.setdefault(job_id, threading.Event())
            try:
                execute_job(self.store, job_id, home=self.home, cancelled=ev.is_set)
            except Exception:  # noqa: BLE001 - execute_job records job failures; keep serving
                log.exception("retraining worker: job %s", job_id)


def retrainer_actor(settings: dict):
    """The retraining actor (created on first use; one per cluster)."""
    import ray

    cls = ray.remote(Retrainer)
    return cls.options(
        name=ACTOR_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=0,
        max_concurrency=8,
        num_cpus=0,
    ).remote(settings)
