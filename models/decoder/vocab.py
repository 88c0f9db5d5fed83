"""Vocabularies of a decoder: unit ids, session ids, genetic classes (saved as ``vocab.json``).

The model only sees integer indices; this maps the strings of a `Recording` to them. Vocabularies
only grow: adding a session appends its id and any unit ids not seen before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.data.recording import Recording


@dataclass
class Vocab:
    unit_ids: list[str] = field(default_factory=list)
    session_ids: list[str] = field(default_factory=list)
    genetic_classes: list[str] = field(default_factory=list)
    # genetic label of each session as used in training ("" = not used: e.g. adapted sessions,
    # whose embeddings were fitted without genetic labels)
    session_genetic: dict[str, str] = field(default_factory=dict)
    # facts per session (sampling rate, number of units, source, how its embedding was fitted)
    session_info: dict[str, dict] = field(default_factory=dict)
    # unit ids of each session (which session a unit was recorded in; the service uses it to
    # pick the session embedding that stands in for a session the model has not seen)
    session_units: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._unit = {u: i for i, u in enumerate(self.unit_ids)}
        self._session = {s: i for i, s in enumerate(self.session_ids)}

    # -- lookups ----------------------------------------------------------------------------------
    def unit_index(self, unit_ids) -> np.ndarray:
        """Index of each unit id (-1 for ids not in the vocabulary)."""
        return np.asarray([self._unit.get(str(u), -1) for u in unit_ids], dtype=np.int64)

    def session_index(self, session_id: str) -> int:
        try:
            return self._session[session_id]
        except KeyError:
            raise KeyError(
                f"session '{session_id}' is not in the model's vocabulary "
                f"({len(self.session_ids)} sessions); adapt the model to it first "
                "(cortexlens adapt)"
            ) from None

    def has_session(self, session_id: str) -> bool:
        return session_id in self._session

    @property
    def n_units(self) -> int:
        return len(self.unit_ids)

    @property
    def n_sessions(self) -> int:
        return len(self.session_ids)

    # -- growth -----------------------------------------------------------------------------------
    def add_recording(self, rec: Recording, *, genetic: str | None = None, how: str = "") -> None:
        """Add a recording's session and any new unit ids."""
        for u in rec.unit_ids:
            if u not in self._unit:
                self._unit[u] = len(self.unit_ids)
                self.unit_ids.append(u)
        if rec.session_id not in self._session:
            self._session[rec.session_id] = len(self.session_ids)
            self.session_ids.append(rec.session_id)
        self.session_genetic[rec.session_id] = genetic if genetic is not None else ""
        self.session_units[rec.session_id] = [str(u) for u in rec.unit_ids]
        self.session_info[rec.session_id] = {
            "n_units": rec.n_units,
            "sampling_rate": rec.sampling_rate,
            "source": rec.source,
            "genetic_background": rec.genetic_background,
            "embedding_fit": how,
        }

    def copy(self) -> Vocab:
        return Vocab.from_dict(json.loads(json.dumps(self.to_dict())))

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "unit_ids": self.unit_ids,
            "session_ids": self.session_ids,
            "genetic_classes": self.genetic_classes,
            "session_genetic": self.session_genetic,
            "session_info": self.session_info,
            "session_units": self.session_units,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        return cls(
            unit_ids=list(d["unit_ids"]),
            session_ids=list(d["session_ids"]),
            genetic_classes=list(d.get("genetic_classes", [])),
            session_genetic=dict(d.get("session_genetic", {})),
            session_info=dict(d.get("session_info", {})),
            session_units={k: list(v) for k, v in d.get("session_units", {}).items()},
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        return cls.from_dict(json.loads(Path(path).read_text()))
