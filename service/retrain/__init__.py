"""Retraining jobs on recorded sessions: new-session adaptation, SAE refit, full fine-tune.

Plain Python + Ray Train (no Serve, no gRPC): the service's retraining actor wraps these.

- `JobSpec` / `GateConfig`: what a job asks for and the promotion rules (printed in every result);
- `JobStore`: durable job records, ``<home>/jobs/<job_id>.json`` (atomic replace), with
  `JobStore.recover` after a restart;
- `load_session`: a recorded session (durable frame record + ``trials.jsonl``) as a `Recording`;
- `run_job`: the job itself (train, evaluate against the serving version on held-out trials,
  SAE metrics and unit labels with controls, publish with parent + provenance, promote if the
  gates pass); see `service.retrain.run`.
"""

from service.retrain.data import load_session, original_recordings, read_trials
from service.retrain.jobs import (
    ACTIVE_STATES,
    INTERRUPTED_MESSAGE,
    STATES,
    TERMINAL_STATES,
    GateConfig,
    JobCancelled,
    JobSpec,
    JobStore,
)
from service.retrain.run import (
    DEFAULT_EPOCHS,
    apply_gates,
    execute_job,
    format_exception,
    run_job,
)

__all__ = [
    "ACTIVE_STATES",
    "DEFAULT_EPOCHS",
    "INTERRUPTED_MESSAGE",
    "STATES",
    "TERMINAL_STATES",
    "GateConfig",
    "JobCancelled",
    "JobSpec",
    "JobStore",
    "apply_gates",
    "execute_job",
    "format_exception",
    "load_session",
    "original_recordings",
    "read_trials",
    "run_job",
]
