"""Ingestion core of the service: one `SessionBuffer` per live session, with its `FrameRecord`.

Plain Python objects (no ray, no grpc) so they can be unit-tested; the service wraps each session
in a thin Ray actor and maps `IngestError.code` onto gRPC status codes.

- `SessionBuffer` (session.py): validation, ordering by frame index, duplicates, gaps (masked),
  late frames, the ring-buffer window, decode stride, the bounded pending-decode queue with
  backpressure, counters matching ``SessionStatus``.
- `FrameRecord` (record.py): the durable append-only record of every frame received (chunked,
  CRC-checked, fsync'd segment files) that survives a crash and exports to a `Recording`.
"""

from service.ingest.errors import IngestError
from service.ingest.record import (
    FrameRecord,
    RecordFrames,
    RecordHeader,
    RecoveryReport,
    record_status,
    session_dir,
    stream_frame_indices,
)
from service.ingest.session import (
    STATUS_FIELDS,
    DecodeTask,
    IngestConfig,
    PushResult,
    SessionBuffer,
    StreamEvent,
    Window,
)

__all__ = [
    "STATUS_FIELDS",
    "DecodeTask",
    "FrameRecord",
    "IngestConfig",
    "IngestError",
    "PushResult",
    "RecordFrames",
    "RecordHeader",
    "RecoveryReport",
    "SessionBuffer",
    "StreamEvent",
    "Window",
    "record_status",
    "session_dir",
    "stream_frame_indices",
]
