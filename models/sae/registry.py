"""Architecture registry: name -> SAE class, plus build/load by config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from models.sae.base import CFG_FILE, WEIGHTS_FILE, SparseAutoencoder
from models.sae.config import SAEConfig

_REGISTRY: dict[str, type[SparseAutoencoder]] = {}


def register_sae(name: str) -> Callable[[type[SparseAutoencoder]], type[SparseAutoencoder]]:
    """Class decorator: make an SAE architecture available under ``name``."""

    def deco(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"SAE architecture '{name}' is already registered")
        cls.architecture = name
        _REGISTRY[name] = cls
        return cls

    return deco


def get_sae_class(name: str) -> type[SparseAutoencoder]:
    _ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown SAE architecture '{name}' (known: {known})") from None


def available_architectures() -> list[str]:
    _ensure_builtin()
    return sorted(_REGISTRY)


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """A freshly initialised SAE of ``cfg.architecture``."""
    return get_sae_class(cfg.architecture)(cfg)


def load_sae(
    directory: str | Path | None = None,
    *,
    cfg_path: str | Path | None = None,
    weights_path: str | Path | None = None,
    device: str = "cpu",
) -> SparseAutoencoder:
    """Load an SAE saved by :meth:`SparseAutoencoder.save` (``cfg.json`` + ``sae.safetensors``).

    Either a directory, or explicit ``cfg_path``/``weights_path`` (e.g. inside a bundle).
    Weights are read with safetensors only.
    """
    if directory is not None:
        cfg_path = cfg_path or Path(directory) / CFG_FILE
        weights_path = weights_path or Path(directory) / WEIGHTS_FILE
    if cfg_path is None or weights_path is None:
        raise ValueError("give a directory or both cfg_path and weights_path")
    if not Path(weights_path).is_file():
        raise FileNotFoundError(f"{weights_path}: no such SAE weights file")
    sae = build_sae(SAEConfig.load(cfg_path))
    sae.load_weights(weights_path)
    return sae.to(device).eval()


def _ensure_builtin() -> None:
    # importing the modules registers the built-in architectures
    from models.sae import batchtopk, relu, topk  # noqa: F401
