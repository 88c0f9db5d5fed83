"""Typed errors of the ingestion core, each carrying the gRPC status code it maps to.

The ingestion objects never import grpc; the servicer maps ``IngestError.code`` (a
``grpc.StatusCode`` member name) onto the status it returns, with ``message`` as the details.
"""

from __future__ import annotations

# gRPC status code names the ingestion core raises (see protos/cortexlens/v1/cortexlens.proto).
CODES = frozenset(
    {
        "INVALID_ARGUMENT",  # shape, NaN/Inf, wrong unit count, byte length, timestamps
        "FAILED_PRECONDITION",  # out of order beyond repair, session closed, record locked
        "RESOURCE_EXHAUSTED",  # decode queue full (refuse policy), block too large
        "NOT_FOUND",  # no record for a session
        "ALREADY_EXISTS",  # a record already exists where a new one is created
        "DATA_LOSS",  # a durable record is corrupt (not a torn tail) and cannot be repaired
        "UNAVAILABLE",  # draining, or a dependency (model replica, session actor) is down
        "UNAUTHENTICATED",  # missing or wrong bearer token
        "INTERNAL",  # a bug: never a user's fault
    }
)


class IngestError(Exception):
    """An error with a gRPC status code name and a message a person can act on."""

    def __init__(self, code: str, message: str):
        if code not in CODES:
            raise ValueError(f"unknown status code name {code!r} (one of {sorted(CODES)})")
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")

    def __reduce__(self):  # pickles across processes (Ray actors) with its code and message
        return (type(self), (self.code, self.message))
