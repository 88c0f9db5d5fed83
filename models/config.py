"""The one config system: typed pydantic models that serialise to and from JSON files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate."""


class Config(BaseModel):
    """Base for every typed config (decoder, SAE, training, service settings).

    Unknown keys are rejected so that typos in a config file are caught, not ignored.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Self:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(f"{path}: invalid {cls.__name__}:\n{e}") from None
