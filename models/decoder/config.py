"""Typed configs of the decoder and its training (the one config system: `models.config`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from models.config import Config

TokenizerName = Literal["patch", "poyo"]


class DecoderConfig(Config):
    """Architecture of the decoder. Vocabulary sizes grow when sessions are added."""

    tokenizer: TokenizerName = "patch"
    window_s: float = Field(1.0, gt=0, description="context window ending at each decoded time")
    patch_samples: int = Field(16, ge=1, description="patch: samples per cell token")
    dim: int = Field(64, ge=8)
    dim_head: int = Field(32, ge=4)
    cross_heads: int = Field(2, ge=1)
    self_heads: int = Field(2, ge=1)
    depth: int = Field(2, ge=0, description="self-attention layers in the processor")
    num_latents: int = Field(8, ge=1, description="latent tokens spread along the window")
    ffn_mult: int = Field(2, ge=1)
    direct_path: bool = Field(
        True,
        description="add a linear per-cell path (cell's mean value x a projection of its unit "
        "embedding, averaged over tokens) to every latent",
    )
    unit_stats_input: bool = Field(
        True,
        description="add each unit's normalisation statistics (log robust scale, median over "
        "scale; label-free, from the unit's own frames) to its tokens, so the absolute level "
        "of activity the z-scoring removes stays readable (e.g. for genetic background)",
    )
    session_free_tasks: list[str] = Field(
        default_factory=list,
        description="tasks whose output query leaves out the session embedding (task embedding "
        "only), e.g. ['genetic']: a session-level label then has to be read from the activity, "
        "not looked up from the session's identity",
    )
    identity_blind_tasks: list[str] = Field(
        default_factory=lambda: ["genetic"],
        description="tasks trained blind to the identity of the cells and session, e.g. "
        "['genetic']: their query leaves out the session embedding (as session_free_tasks) and "
        "their training loss comes from a second pass with the unit embeddings detached, so it "
        "never reaches the unit or session embeddings: a session-level label cannot be written "
        "into a session's own rows, as it cannot for a session whose embeddings are fitted "
        "without it",
    )
    population_stats: bool = Field(
        True,
        description="add to every latent a projection of the mean over the window's cells of "
        "their normalisation statistics (log robust scale, median over scale; label-free): a "
        "permutation-invariant summary of the population's absolute activity, which the "
        "per-cell z-scoring removes (e.g. for the genetic background of a new session)",
    )
    dropout: float = Field(0.2, ge=0, lt=1)
    emb_init_scale: float = Field(0.02, description="init std of session/task/latent rows")
    unit_init_scale: float = Field(0.1, description="init std of unit embedding rows")
    t_min: float = Field(0.02, gt=0, description="shortest rotary period (s)")
    t_max: float = Field(4.0, gt=0, description="longest rotary period (s)")
    n_units: int = Field(1, ge=1, description="rows of the unit embedding")
    n_sessions: int = Field(1, ge=1, description="rows of the session embedding")
    tasks: dict[str, int] = Field(
        default_factory=lambda: {"direction": 8}, description="task -> number of classes"
    )

    @property
    def value_dim(self) -> int:
        return self.patch_samples if self.tokenizer == "patch" else 1


class TrainConfig(Config):
    """Training hyper-parameters (CPU-friendly defaults)."""

    seed: int = 0
    epochs: int = Field(80, ge=1)
    patience: int = Field(20, ge=1, description="epochs without val improvement before stopping")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    emb_lr_mult: float = Field(
        5.0, gt=0, description="learning-rate multiplier of the unit and session embeddings"
    )
    warmup_epochs: int = Field(2, ge=0)
    windows_per_trial: int = Field(4, ge=1, description="training windows per trial per epoch")
    train_from_s: float = Field(
        0.5, description="training windows end from this long after onset ..."
    )
    train_post_s: float = Field(0.0, ge=0, description="... to this long after the trial end")
    decode_from_s: float = Field(
        1.0, description="trial-level decoding pools windows ending from onset + this to the end"
    )
    unit_dropout: float = Field(0.1, ge=0, lt=1, description="fraction of cells hidden per window")
    noise_std: float = Field(0.1, ge=0, description="gaussian noise on normalised values")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    ema_decay: float = Field(
        0.0, ge=0, lt=1, description="exponential moving average of the weights (0 = off)"
    )
    genetic_weight: float = Field(0.2, ge=0, description="loss weight of the genetic task")
    select_on: Literal["accuracy", "nll"] = Field(
        "nll",
        description="model selection / early stopping on validation direction accuracy (ties: "
        "NLL) or on validation NLL summed over the trial tasks (direction, temporal frequency)",
    )
    finetune_epochs: int = Field(
        10,
        ge=0,
        description="after training: epochs fitting only the unit and session embeddings (shared "
        "weights frozen, no dropout), kept only where validation improves; at most ``epochs`` "
        "(0 = off)",
    )
    val_stride: int = Field(
        1,
        ge=1,
        description="validation pools every n-th decoded window of a trial (1 = all; test and "
        "evaluation always pool all)",
    )
    tuning_init: float = Field(
        1.0,
        ge=0,
        description="initialise each unit's gain embedding from its tuning on the training "
        "trials (per-class mean normalised response, direction and temporal frequency, through "
        "a fixed random projection), times this scale; 0 = random init",
    )
    finetune_lr: float = Field(1e-2, gt=0, description="learning rate of the fine-tuning stage")
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    threads: int = Field(1, ge=1, description="torch CPU threads (1 is fastest for small models)")
    max_minutes: float | None = Field(None, description="stop training after this wall time")


#: Values that fields added or re-defaulted later had in checkpoints saved before them: a saved
#: config that lacks one of these keys was trained (and must be rebuilt) with this value, not
#: with today's default.
LEGACY_DECODER: dict[str, object] = {
    "direct_path": False,
    "unit_stats_input": False,
    "unit_init_scale": 1.0,
    "session_free_tasks": [],
    "identity_blind_tasks": [],
    "population_stats": False,
}
LEGACY_TRAINING: dict[str, object] = {
    "emb_lr_mult": 1.0,
    "select_on": "accuracy",
    "finetune_epochs": 0,
    "tuning_init": 0.0,
    "val_stride": 1,
}


class CheckpointConfig(Config):
    """What `config.json` of a checkpoint holds. Saved configs missing keys added since are read
    with their legacy values (`LEGACY_DECODER`, `LEGACY_TRAINING`), so old checkpoints keep
    loading and adapting as they were trained."""

    decoder: DecoderConfig
    training: TrainConfig | None = None
    sources: list[str] = Field(default_factory=list, description="data the model was trained on")
    parent: str | None = Field(None, description="checkpoint this one was adapted from")

    @model_validator(mode="before")
    @classmethod
    def _legacy_defaults(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("decoder"), dict):
            data["decoder"] = {**LEGACY_DECODER, **data["decoder"]}
        if isinstance(data.get("training"), dict):
            data["training"] = {**LEGACY_TRAINING, **data["training"]}
        return data
