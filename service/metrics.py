"""Prometheus metrics of the service (prefix ``cortexlens_``), served over HTTP on a port.

Every metric is recorded in the ingress process, which sees each frame, each decode result (with
the decoder replica's own queue and model times and batch size) and each session; so one scrape
per ingress replica gives the whole picture.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("cortexlens.metrics")

_LAT = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.033, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.frame_to_explanation = Histogram(
            "cortexlens_frame_to_explanation_seconds",
            "From a frame's message reaching the ingress to its prediction leaving it.",
            registry=r,
            buckets=_LAT,
        )
        self.queue_wait = Histogram(
            "cortexlens_queue_wait_seconds",
            "Time a window waited in the decoder replica for its batch.",
            registry=r,
            buckets=_LAT,
        )
        self.model_time = Histogram(
            "cortexlens_model_seconds",
            "ONNX Runtime time of the batch a window was decoded in.",
            registry=r,
            buckets=_LAT,
        )
        self.batch_size = Histogram(
            "cortexlens_batch_size",
            "Windows per decoder batch.",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.frames_received = Counter(
            "cortexlens_frames_received", "Frames received on streams.", registry=r
        )
        self.frames_dropped = Counter(
            "cortexlens_frames_dropped",
            "Frames or decodes dropped, by reason (duplicate, late, coalesced).",
            ["reason"],
            registry=r,
        )
        self.frames_out_of_order = Counter(
            "cortexlens_frames_out_of_order",
            "Frames that arrived after a later frame (late, placed or dropped).",
            registry=r,
        )
        self.frames_missing = Counter(
            "cortexlens_frames_missing", "Frames reported missing (gaps).", registry=r
        )
        self.predictions = Counter(
            "cortexlens_predictions", "Predictions sent.", ["method"], registry=r
        )
        self.requests = Counter(
            "cortexlens_requests", "RPCs by method and status code.", ["method", "code"], registry=r
        )
        self.active_sessions = Gauge(
            "cortexlens_active_sessions", "Live streaming sessions.", registry=r
        )
        self.model_version = Gauge(
            "cortexlens_model_version_info",
            "The model version last seen in a response (value 1).",
            ["name", "version", "label_set"],
            registry=r,
        )
        self.unit_active = Counter(
            "cortexlens_sae_unit_active",
            "Predictions in which an SAE unit was among the explained top units (its rate is "
            "the unit's firing rate, for drift).",
            ["unit"],
            registry=r,
        )
        self.quota_refusals = Counter(
            "cortexlens_quota_refusals",
            "Streams ended with RESOURCE_EXHAUSTED by a per-session quota, by quota "
            "(frame_rate, record_bytes, trials).",
            ["quota"],
            registry=r,
        )
        self.auth_refusals = Counter(
            "cortexlens_auth_refusals",
            "RPCs refused with UNAUTHENTICATED (missing or wrong bearer token), by reason.",
            ["reason"],
            registry=r,
        )
        self._version_key: tuple[str, str, str] | None = None
        self.port: int | None = None

    def set_model(self, name: str, version: str, label_set: str) -> None:
        key = (name, version, label_set)
        if key == self._version_key:
            return
        if self._version_key is not None:
            self.model_version.remove(*self._version_key)
        self.model_version.labels(*key).set(1)
        self._version_key = key

    def serve(self, port: int, host: str = "127.0.0.1", tries: int = 16) -> int | None:
        """Serve /metrics on ``port`` (or the next free one); returns the port, None if off."""
        if port <= 0:
            return None
        for p in range(port, port + tries):
            try:
                start_http_server(p, addr=host, registry=self.registry)
            except OSError:
                continue
            self.port = p
            log.info("cortexlens metrics on :%d/metrics", p)
            return p
        log.warning("no free metrics port in %d-%d; metrics not served", port, port + tries - 1)
        return None
