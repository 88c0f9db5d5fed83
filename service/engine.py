"""The serving engine: a verified bundle's ONNX graph run on batches of live windows.

A plain Python object (onnxruntime + numpy, no torch, no ray, no grpc), so the Serve deployment
is a thin shell around it and everything here is unit-tested directly.

- `Engine(bundle)` opens a bundle (every hash verified), loads its ONNX graph from the verified
  bytes into an ONNX Runtime session, and reads the tokenizer, tasks, vocabularies and unit labels.
- `Engine.plan(session_id, unit_ids)` maps a session's cells onto the model's unit vocabulary
  (`SessionPlan`). Cells the model has never seen are masked out; a session the model has no
  embedding for borrows the embedding of the known session sharing the most unit ids; a session
  with no known cell cannot be decoded (``decodable`` False) and is only recorded.
- `Engine.run(items)` decodes a batch of windows (any mix of sessions and cell counts) in one
  ONNX Runtime call (`models.runtime.Runner`: I/O binding on a GPU provider; with
  ``fixed_shapes``, the smallest of the bundle's fixed-shape graphs that holds the batch, padded)
  and returns one `Decoded` per window: per task the logits, probabilities, the predicted class,
  and the top-M SAE units for the predicted class ranked by |attribution| with their labels, plus
  the unexplained part, so that the listed attributions plus ``unexplained`` equal the predicted
  class's logit.

Windows hold raw dF/F ``[frames, cells]`` with NaN rows for missing frames (gaps): those frames
are left out of the tokens (the tokenizers take irregular frame times), never filled with zeros.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.bundle import Bundle
from models.decoder.tokenizers import collate, get_tokenizer
from models.decoder.vocab import Vocab
from models.runtime import FixedShapeRunner, Runner, ort_session
from models.tasks import class_names
from service.ingest.errors import IngestError

MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class SessionPlan:
    """How one session's cells and id map onto the model."""

    session_id: str
    unit_ids: tuple[str, ...]
    unit_index: np.ndarray  # int64 [N]: vocabulary index per cell, -1 = unknown to the model
    session_index: int  # session embedding used (-1 when not decodable)
    session_known: bool  # the model has an embedding for this very session
    embedding_from: str  # session id whose embedding is used ("" when not decodable)

    @property
    def known(self) -> np.ndarray:
        return self.unit_index >= 0

    @property
    def n_known(self) -> int:
        return int(self.known.sum())

    @property
    def decodable(self) -> bool:
        return self.session_index >= 0 and self.n_known > 0


@dataclass(frozen=True)
class WindowItem:
    """One window to decode: the frames up to ``end_time`` of one session."""

    plan: SessionPlan
    values: np.ndarray  # float32 [F, N]; rows of NaN = missing frames
    frame_times: np.ndarray  # float64 [F] (NaN allowed for missing frames)
    end_time: float
    top_m: int = 0  # 0 = the engine's default


@dataclass(frozen=True)
class UnitAttribution:
    unit: int
    activation: float
    attribution: float
    label: str


@dataclass(frozen=True)
class TaskResult:
    task: str
    predicted_class: int
    predicted_label: str
    class_names: tuple[str, ...]
    probabilities: np.ndarray
    logits: np.ndarray
    units: tuple[UnitAttribution, ...]
    unexplained: float


@dataclass(frozen=True)
class Decoded:
    tasks: tuple[TaskResult, ...]
    masked_fraction: float  # frames of the window missing (gaps)
    n_cells_used: int
    model_ms: float  # the whole batch's ONNX Runtime time
    batch_size: int


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    label_set: str


@dataclass
class _Labels:
    text: list[str]
    doc: dict = field(default_factory=dict)


class Engine:
    """A bundle's ONNX graph, tokenizer, vocabularies and unit labels, ready to decode."""

    def __init__(
        self,
        bundle: str | Path | Bundle,
        *,
        name: str | None = None,
        threads: int = 1,
        providers: Sequence[str] | None = None,
        trt_fp16: bool = False,
        trt_cache_dir: str | Path | None = None,
        io_binding: bool | None = None,
        fixed_shapes: bool = False,
    ):
        b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.bundle = b
        self.config = b.read_json("config.json")
        exp = self.config["export"]
        dec = self.config["checkpoint"]["decoder"]
        self.vocab = Vocab.from_dict(b.read_json("vocab.json"))
        self.tokenizer = get_tokenizer(
            dec["tokenizer"], window_s=float(dec["window_s"]), patch_samples=dec["patch_samples"]
        )
        self.window_s = float(dec["window_s"])
        self.top_m = int(exp["top_m"])
        self.method = str(exp.get("method", "ablation"))
        self.task_names: tuple[str, ...] = tuple(sorted(exp["tasks"]))
        self.class_names = {
            t: tuple(class_names(t, self.vocab.genetic_classes)) for t in self.task_names
        }
        for t, n in exp["tasks"].items():
            if len(self.class_names[t]) != int(n):
                raise IngestError(
                    "FAILED_PRECONDITION",
                    f"bundle {b.path}: task {t} has {n} outputs but {len(self.class_names[t])} "
                    "class names",
                )
        units_raw = b.read_bytes("units.json")
        doc = json.loads(units_raw)
        self.units_doc = doc
        n_units = int(self.config["sae"]["n_units"])
        self.n_sae_units = n_units
        text = [""] * n_units
        for u in doc.get("units", []):
            if 0 <= int(u.get("id", -1)) < n_units:
                text[int(u["id"])] = str(u.get("label", ""))
        self.labels = text
        units_sha = hashlib.sha256(units_raw).hexdigest()[:12]
        self.ref = ModelRef(
            name=name or b.name,
            version=b.version or b.content_sha256[:12],
            label_set=f"{b.version or 'unversioned'}/units-{units_sha}",
        )
        self.parent = b.parent or ""
        self.session = ort_session(
            b.read_bytes(MODEL_FILE),
            threads,
            providers,
            trt_fp16=trt_fp16,
            trt_cache_dir=trt_cache_dir,
        )
        self.runner = Runner(self.session, io_binding=io_binding)
        self.input_names = self.runner.input_names
        self.output_names = self.runner.output_names
        # the bundle's fixed-shape graphs (CUDA graphs on the CUDA provider), smallest first
        self.fixed: list[FixedShapeRunner] = []
        for spec in exp.get("fixed_shapes", []) if fixed_shapes else []:
            sess = ort_session(
                b.read_bytes(spec["file"]),
                threads,
                providers,
                trt_fp16=trt_fp16,
                trt_cache_dir=trt_cache_dir,
                cuda_graph=True,
            )
            self.fixed.append(FixedShapeRunner(sess))
        self.fixed.sort(key=lambda r: (r.batch * r.tokens, r.batch))
        missing = {"units", "activations"} - set(self.output_names)
        for t in self.task_names:
            missing |= {f"{t}.logits", f"{t}.probs", f"{t}.attributions"} - set(self.output_names)
        if missing:
            raise IngestError(
                "FAILED_PRECONDITION",
                f"bundle {b.path}: model.onnx lacks outputs {sorted(missing)}; re-export it",
            )

    # -- metadata ---------------------------------------------------------------------------------
    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def window_frames(self, frame_rate_hz: float) -> int:
        """Ring size for a stream at ``frame_rate_hz``: one model window of frames, plus one."""
        return int(np.ceil(self.window_s * float(frame_rate_hz) - 1e-6)) + 1

    def model_info(self) -> dict:
        """What `GetModel` returns, as plain data."""
        return {
            "ref": self.ref,
            "parent_version": self.parent,
            "tasks": [(t, self.class_names[t]) for t in self.task_names],
            "n_sae_units": self.n_sae_units,
            "attribution_method": self.method,
            "tokenizer": self.tokenizer.name,
            "window_s": self.window_s,
            "default_top_m": self.top_m,
            "manifest_json": self.bundle.manifest.model_dump_json(),
            "metrics_json": json.dumps(self.bundle.read_json("metrics.json")),
            "sessions": list(self.vocab.session_ids),
        }

    def units(self, variable: str = "") -> list[dict]:
        """Per SAE unit: labels with statistics and firing rate (units.json), optionally only
        units labelled for ``variable``."""
        out = []
        by_id = {int(u["id"]): u for u in self.units_doc.get("units", []) if "id" in u}
        for uid in range(self.n_sae_units):
            u = by_id.get(uid, {})
            labels = []
            for lab in u.get("labels", []) or []:
                labels.append(
                    {
                        "variable": str(lab.get("variable", "")),
                        "text": str(lab.get("text", "")),
                        "statistic_name": str(lab.get("statistic", "")),
                        "statistic": float(lab.get("value", float("nan"))),
                        "p_value": float(lab.get("p", float("nan"))),
                        "q_value": float(lab.get("q", float("nan"))),
                        "reproduced_across_seeds": bool(lab.get("reproduced_across_seeds")),
                    }
                )
            if variable and not any(lab["variable"] == variable for lab in labels):
                continue
            out.append(
                {"unit": uid, "labels": labels, "firing_rate": float(u.get("firing_rate", 0.0))}
            )
        return out

    # -- sessions ---------------------------------------------------------------------------------
    def plan(self, session_id: str, unit_ids: Sequence[str]) -> SessionPlan:
        """Map a session's cells and id onto the model (see the module docstring)."""
        ids = tuple(str(u) for u in unit_ids)
        if not ids:
            raise IngestError("INVALID_ARGUMENT", "unit_ids must list the cells of the window")
        if len(set(ids)) != len(ids):
            raise IngestError("INVALID_ARGUMENT", "unit_ids must be unique")
        idx = self.vocab.unit_index(ids)
        known_ids = {u for u, i in zip(ids, idx, strict=True) if i >= 0}
        if self.vocab.has_session(session_id):
            return SessionPlan(
                session_id, ids, idx, self.vocab.session_index(session_id), True, session_id
            )
        if not known_ids:
            return SessionPlan(session_id, ids, idx, -1, False, "")
        # the known session sharing the most unit ids lends its embedding (ties: the first)
        overlap = [
            len(known_ids.intersection(self.vocab.session_units.get(s, ())))
            for s in self.vocab.session_ids
        ]
        best = self.vocab.session_ids[int(np.argmax(overlap))]
        return SessionPlan(session_id, ids, idx, self.vocab.session_index(best), False, best)

    # -- decoding ---------------------------------------------------------------------------------
    def tokens(self, item: WindowItem) -> dict[str, np.ndarray]:
        plan = item.plan
        vals = np.asarray(item.values, dtype=np.float32)
        if vals.ndim != 2 or vals.shape[1] != len(plan.unit_ids):
            raise IngestError(
                "INVALID_ARGUMENT",
                f"window has shape {vals.shape}, expected [frames, {len(plan.unit_ids)}]",
            )
        times = np.asarray(item.frame_times, dtype=np.float64)
        present = np.isfinite(vals).all(axis=1) & np.isfinite(times)
        known = plan.known
        x = vals[present][:, known]
        return self.tokenizer.tokenize(x, times[present], item.end_time, plan.unit_index[known])

    def run(self, items: Sequence[WindowItem]) -> list[Decoded]:
        """Decode a batch of windows in one ONNX Runtime call."""
        if not items:
            return []
        for it in items:
            if not it.plan.decodable:
                raise IngestError(
                    "FAILED_PRECONDITION",
                    f"the model knows none of the {len(it.plan.unit_ids)} cells of session "
                    f"{it.plan.session_id!r}; adapt the model to this session first",
                )
        samples = [self.tokens(it) for it in items]
        batch = collate(samples, [it.plan.session_index for it in items])
        feeds = {k: batch[k] for k in self.input_names}
        n_tokens = int(batch["mask"].shape[1])
        runner = next((r for r in self.fixed if r.fits(len(items), n_tokens)), self.runner)
        t0 = time.perf_counter()
        out = dict(zip(runner.output_names, runner.run(feeds), strict=True))
        model_ms = (time.perf_counter() - t0) * 1e3
        res = []
        for i, it in enumerate(items):
            times = np.asarray(it.frame_times, dtype=np.float64)
            present = np.isfinite(np.asarray(it.values)).all(axis=1) & np.isfinite(times)
            masked = 1.0 - float(present.mean()) if present.size else 1.0
            m = min(int(it.top_m) or self.top_m, self.top_m)
            tasks = []
            for t in self.task_names:
                logits = out[f"{t}.logits"][i]
                probs = out[f"{t}.probs"][i]
                c = int(np.argmax(logits))
                attr = out[f"{t}.attributions"][i][:, c]  # [M]
                order = np.argsort(-np.abs(attr), kind="stable")[:m]
                units = tuple(
                    UnitAttribution(
                        unit=int(out["units"][i, j]),
                        activation=float(out["activations"][i, j]),
                        attribution=float(attr[j]),
                        label=self.labels[int(out["units"][i, j])]
                        if 0 <= int(out["units"][i, j]) < len(self.labels)
                        else "",
                    )
                    for j in order
                )
                unexplained = float(logits[c]) - float(sum(u.attribution for u in units))
                tasks.append(
                    TaskResult(
                        task=t,
                        predicted_class=c,
                        predicted_label=self.class_names[t][c],
                        class_names=self.class_names[t],
                        probabilities=probs.astype(np.float32),
                        logits=logits.astype(np.float32),
                        units=units,
                        unexplained=unexplained,
                    )
                )
            res.append(
                Decoded(
                    tasks=tuple(tasks),
                    masked_fraction=masked,
                    n_cells_used=it.plan.n_known,
                    model_ms=model_ms,
                    batch_size=len(items),
                )
            )
        return res
