"""Data layer: the `Recording` type, loaders/writers for every source, and the simulator."""

from models.data.recording import DataError, Recording, Trials

__all__ = ["DataError", "Recording", "Trials"]
