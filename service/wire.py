"""Conversions between the gRPC contract (`service.protos_gen`) and the plain objects of the
service (engine results, ingestion events and status), and validation of incoming windows.

No ray here: the servicer methods call these, and they are unit-tested without a server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from service.engine import Decoded, ModelRef
from service.ingest import IngestError, StreamEvent
from service.protos_gen.cortexlens.v1 import cortexlens_pb2 as pb

UNIT_SEP = "\x1f"


def units_key(unit_ids: Sequence[str]) -> str:
    """Unit ids as one string (cheap to send with every window, hashable for caches)."""
    return UNIT_SEP.join(unit_ids)


def split_units_key(key: str) -> tuple[str, ...]:
    return tuple(key.split(UNIT_SEP))


def check_unit_ids(unit_ids: Sequence[str], max_cells: int) -> tuple[str, ...]:
    ids = tuple(str(u) for u in unit_ids)
    if not ids:
        raise IngestError(
            "INVALID_ARGUMENT", "unit_ids is empty: list the cells in the column order of frames"
        )
    if len(ids) > max_cells:
        raise IngestError(
            "RESOURCE_EXHAUSTED",
            f"{len(ids)} cells exceed this server's limit of {max_cells} cells per session",
        )
    if any(not u or UNIT_SEP in u for u in ids):
        raise IngestError("INVALID_ARGUMENT", "unit_ids must be non-empty strings")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(u for u in ids if u in seen or seen.add(u))
        raise IngestError("INVALID_ARGUMENT", f"unit_ids must be unique; {dup!r} appears twice")
    return ids


def window_from_block(
    block: pb.FrameBlock, n_cells: int, max_frames: int
) -> tuple[np.ndarray, np.ndarray]:
    """A unary window's ``values [F, N]`` float32 and ``timestamps [F]``, validated."""
    nf, nc = int(block.n_frames), int(block.n_cells)
    if nc != n_cells:
        raise IngestError(
            "INVALID_ARGUMENT",
            f"window says n_cells={nc} but {n_cells} unit_ids were given; send one column per "
            "unit id, in the same order",
        )
    if nf < 1:
        raise IngestError("INVALID_ARGUMENT", "window has n_frames=0; send at least one frame")
    if nf > max_frames:
        raise IngestError(
            "RESOURCE_EXHAUSTED",
            f"window of {nf} frames exceeds the limit of {max_frames} frames; send only the last "
            "~1 s of frames",
        )
    want = nf * nc * 4
    if len(block.values) != want:
        raise IngestError(
            "INVALID_ARGUMENT",
            f"window values hold {len(block.values)} bytes but n_frames x n_cells x 4 = {nf} x "
            f"{nc} x 4 = {want} (float32, little-endian, row-major [frames, cells])",
        )
    values = np.frombuffer(block.values, dtype="<f4").reshape(nf, nc).astype(np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        f, u = (int(x) for x in np.argwhere(bad)[0])
        raise IngestError(
            "INVALID_ARGUMENT",
            f"window values contain {int(bad.sum())} NaN/Inf (first at frame {f}, column {u}); "
            "send finite dF/F and leave missing frames out",
        )
    ts = np.asarray(block.timestamps, dtype=np.float64)
    if ts.shape != (nf,):
        raise IngestError(
            "INVALID_ARGUMENT", f"got {ts.size} timestamps for {nf} frames; send one per frame"
        )
    if not np.isfinite(ts).all():
        raise IngestError("INVALID_ARGUMENT", "timestamps contain NaN/Inf")
    if nf > 1 and (np.diff(ts) <= 0).any():
        raise IngestError("INVALID_ARGUMENT", "timestamps must be strictly increasing")
    return values, ts


def model_ref_pb(ref: ModelRef) -> pb.ModelRef:
    return pb.ModelRef(name=ref.name, version=ref.version, label_set=ref.label_set)


def prediction_pb(
    d: Decoded,
    *,
    session_id: str,
    frame_index: int,
    timestamp: float,
    ref: ModelRef,
    method: str,
    queue_ms: float,
    server_total_ms: float,
) -> pb.Prediction:
    tasks = [
        pb.TaskPrediction(
            task=t.task,
            predicted_class=t.predicted_class,
            predicted_label=t.predicted_label,
            class_names=list(t.class_names),
            probabilities=t.probabilities.tolist(),
            logits=t.logits.tolist(),
            units=[
                pb.UnitExplanation(
                    unit=u.unit, activation=u.activation, attribution=u.attribution, label=u.label
                )
                for u in t.units
            ],
            unexplained=t.unexplained,
        )
        for t in d.tasks
    ]
    return pb.Prediction(
        session_id=session_id,
        frame_index=int(frame_index),
        timestamp=float(timestamp),
        model=model_ref_pb(ref),
        attribution_method=method,
        tasks=tasks,
        timings=pb.Timings(
            queue_ms=queue_ms,
            model_ms=d.model_ms,
            server_total_ms=server_total_ms,
            batch_size=d.batch_size,
        ),
        masked_fraction=d.masked_fraction,
        n_cells_used=d.n_cells_used,
    )


def event_pb(e: StreamEvent) -> pb.StreamEvent:
    return pb.StreamEvent(
        kind=pb.StreamEvent.Kind.Value(e.kind),
        first_frame_index=int(e.first_frame_index),
        last_frame_index=int(e.last_frame_index),
        message=e.message,
    )


def status_pb(st: Mapping[str, object], ref: ModelRef | None = None) -> pb.SessionStatus:
    def n(key: str) -> int:
        return int(st.get(key, 0) or 0)

    out = pb.SessionStatus(
        session_id=str(st.get("session_id", "")),
        state=pb.SessionStatus.State.Value(str(st.get("state", "STATE_UNSPECIFIED"))),
        frames_received=n("frames_received"),
        frames_recorded=n("frames_recorded"),
        frames_decoded=n("frames_decoded"),
        duplicates_dropped=n("duplicates_dropped"),
        frames_missing=n("frames_missing"),
        late_dropped=n("late_dropped"),
        last_frame_index=int(st.get("last_frame_index", -1)),
        n_cells=n("n_cells"),
        late_filled=n("late_filled"),
        decodes_coalesced=n("decodes_coalesced"),
    )
    if ref is not None:
        out.model.CopyFrom(model_ref_pb(ref))
    return out


def model_info_pb(info: Mapping[str, object]) -> pb.ModelInfo:
    return pb.ModelInfo(
        model=model_ref_pb(info["ref"]),
        parent_version=str(info["parent_version"]),
        tasks=[pb.TaskInfo(name=t, class_names=list(c)) for t, c in info["tasks"]],
        n_sae_units=int(info["n_sae_units"]),
        attribution_method=str(info["attribution_method"]),
        tokenizer=str(info["tokenizer"]),
        window_s=float(info["window_s"]),
        default_top_m=int(info["default_top_m"]),
        manifest_json=str(info["manifest_json"]),
        metrics_json=str(info["metrics_json"]),
    )


def units_pb(ref: ModelRef, units: Sequence[Mapping]) -> pb.ListUnitsResponse:
    return pb.ListUnitsResponse(
        model=model_ref_pb(ref),
        units=[
            pb.UnitInfo(
                unit=int(u["unit"]),
                labels=[pb.UnitLabel(**lab) for lab in u["labels"]],
                firing_rate=float(u["firing_rate"]),
            )
            for u in units
        ],
    )


def job_pb(job: Mapping[str, object]) -> pb.Job:
    """A retraining job record (`service.retrain.JobStore`) as a `pb.Job`."""
    import json

    spec = job.get("spec") or {}
    result = job.get("result")
    return pb.Job(
        job_id=str(job.get("job_id", "")),
        kind=str(spec.get("kind", job.get("kind", ""))),
        session_ids=[str(s) for s in spec.get("session_ids", job.get("session_ids", []))],
        state=str(job.get("state", "")),
        progress=float(job.get("progress") or 0.0),
        message=str(job.get("message") or ""),
        parent_version=str(job.get("parent_version") or ""),
        candidate_version=str(job.get("candidate_version") or ""),
        promoted=bool(job.get("promoted")),
        decision=str(job.get("decision") or ""),
        result_json=json.dumps(result, default=str) if result is not None else "",
        created_at=str(job.get("created_at") or ""),
        started_at=str(job.get("started_at") or ""),
        finished_at=str(job.get("finished_at") or ""),
    )
