"""A decoder checkpoint: a directory of plain files (no pickle).

config.json          `CheckpointConfig`: the typed `DecoderConfig` + `TrainConfig`
decoder.safetensors  weights and per-unit normalisation buffers
vocab.json           unit ids, session ids, genetic classes, per-session genetic labels
splits.json          the train/val/test trial splits used (`models.splits.save_splits`)
train_log.jsonl      one JSON line per epoch (written by training)
learning_curve.png   training loss and validation accuracy per epoch
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.config import ConfigError
from models.decoder.config import CheckpointConfig
from models.decoder.model import Decoder
from models.decoder.tokenizers import Tokenizer, tokenizer_for
from models.decoder.vocab import Vocab
from models.splits import TrialSplit, load_splits, save_splits

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "decoder.safetensors"
VOCAB_FILE = "vocab.json"
SPLITS_FILE = "splits.json"
LOG_FILE = "train_log.jsonl"
CURVE_FILE = "learning_curve.png"


@dataclass
class Checkpoint:
    model: Decoder
    config: CheckpointConfig
    vocab: Vocab
    splits: dict[str, TrialSplit] = field(default_factory=dict)
    path: Path | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        return tokenizer_for(self.config.decoder)

    @property
    def tasks(self) -> dict[str, int]:
        return dict(self.config.decoder.tasks)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().clone() for k, v in self.model.state_dict().items()}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.config.model_copy(update={"decoder": self.model.config})
        config.save(path / CONFIG_FILE)
        save_file(self.state_dict(), str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        self.vocab.save(path / VOCAB_FILE)
        save_splits(self.splits, path / SPLITS_FILE)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu") -> Checkpoint:
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"{path}: not a checkpoint directory")
        config = CheckpointConfig.load(path / CONFIG_FILE)
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise ConfigError(f"{weights}: missing decoder weights")
        vocab_path = path / VOCAB_FILE
        if not vocab_path.is_file():
            raise ConfigError(f"{vocab_path}: missing vocabulary")
        vocab = Vocab.load(vocab_path)
        model = Decoder(config.decoder)
        try:
            model.load_state_dict(load_file(str(weights), device=device))
        except RuntimeError as e:
            raise ConfigError(f"{weights}: weights do not match config.json ({e})") from None
        model.eval()
        splits = load_splits(path / SPLITS_FILE) if (path / SPLITS_FILE).is_file() else {}
        return cls(model=model, config=config, vocab=vocab, splits=splits, path=path)
