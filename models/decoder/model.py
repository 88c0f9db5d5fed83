"""The decoder: a calcium POYO+-style Perceiver built from `torch_brain.nn` blocks.

    tokens (value embedding + unit embedding, time)            [B, N, D]
      -> cross-attention into latents placed along the window   [B, L, D]   (encoder)
      -> self-attention stack                                    [B, L, D]   (processor)
         = `encode(batch)`: "the latent stream after the processor"
      -> output queries (session embedding + task embedding) cross-attend to the latents
      -> one linear head per task                                           (`readout`)

Per-unit normalisation (a robust z-score computed from each unit's frames) lives in the module as
buffers indexed by unit index, so callers pass raw dF/F. Everything is index tensors and masks:
no vocabularies, strings or data-dependent Python control flow inside `forward`, so it traces to
ONNX with ``torch.onnx.export(..., dynamo=True)`` with dynamic batch and token dimensions.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch_brain.nn import RotaryCrossAttention, RotarySelfAttention, RotaryTimeEmbedding

from models.decoder.config import DecoderConfig

BATCH_KEYS = ("values", "unit_index", "timestamps", "mask", "session_index")


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * mult),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(dim * mult, dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """POYO+-style decoder; see the module docstring. Inputs are the `collate` batch keys."""

    unit_loc: Tensor
    unit_scale: Tensor
    latent_timestamps: Tensor
    latent_index: Tensor
    query_session_gate: Tensor

    def __init__(self, config: DecoderConfig):
        super().__init__()
        c = config
        self.config = c
        # sorted: config.json is written with sorted keys, the order must not depend on it
        self.task_names: tuple[str, ...] = tuple(sorted(c.tasks))
        d = c.dim

        # per-unit normalisation (buffers, saved with the weights)
        self.register_buffer("unit_loc", torch.zeros(c.n_units))
        self.register_buffer("unit_scale", torch.ones(c.n_units))

        # a unit's row holds [additive embedding | gain on its value embedding] (2 x dim)
        self.unit_emb = nn.Embedding(c.n_units, 2 * d)
        self.session_emb = nn.Embedding(c.n_sessions, d)
        self.task_emb = nn.Embedding(len(self.task_names), d)
        self.latent_emb = nn.Embedding(c.num_latents, d)
        for emb in (self.session_emb, self.task_emb, self.latent_emb):
            nn.init.normal_(emb.weight, std=c.emb_init_scale)
        self.init_unit_rows(self.unit_emb.weight)
        self.value_emb = nn.Sequential(nn.Linear(c.value_dim, d), nn.GELU(), nn.Linear(d, d))
        # optional linear path: mean over cells of w_u * mean(x_u), w_u = P e_u (logistic-like)
        self.direct_proj = nn.Linear(2 * d, d) if c.direct_path else None
        # optional: the unit's normalisation statistics as a token feature
        self.stats_proj = nn.Linear(2, d) if c.unit_stats_input else None
        # optional: their mean over the window's cells, projected, added to every latent
        self.pop_proj = nn.Linear(2, d) if c.population_stats else None

        # latents evenly along the window, (k + 1) * window / L: the last sits at the window end
        lat_t = torch.arange(1, c.num_latents + 1, dtype=torch.float32) * (
            c.window_s / c.num_latents
        )
        self.register_buffer("latent_timestamps", lat_t, persistent=False)
        self.register_buffer("latent_index", torch.arange(c.num_latents), persistent=False)

        self.rotary_emb = RotaryTimeEmbedding(
            head_dim=c.dim_head, rotate_dim=c.dim_head // 2, t_min=c.t_min, t_max=c.t_max
        )
        self.dropout = nn.Dropout(c.dropout)

        attn = {"dim_head": c.dim_head, "use_xformers": False}
        self.enc_atn = RotaryCrossAttention(dim=d, heads=c.cross_heads, rotate_value=True, **attn)
        self.enc_ffn = FeedForward(d, c.ffn_mult, c.dropout)
        self.proc_layers = nn.ModuleList()
        for _ in range(c.depth):
            self.proc_layers.append(
                nn.ModuleList(
                    [
                        RotarySelfAttention(dim=d, heads=c.self_heads, rotate_value=True, **attn),
                        FeedForward(d, c.ffn_mult, c.dropout),
                    ]
                )
            )
        self.dec_atn = RotaryCrossAttention(dim=d, heads=c.cross_heads, rotate_value=False, **attn)
        self.dec_ffn = FeedForward(d, c.ffn_mult, c.dropout)
        self.out_norm = nn.LayerNorm(d)
        self.heads = nn.ModuleDict({t: nn.Linear(d, c.tasks[t]) for t in self.task_names})
        # 1 where a task's query carries the session embedding, 0 for `session_free_tasks` and
        # `identity_blind_tasks`
        free = set(c.session_free_tasks) | set(c.identity_blind_tasks)
        use_sess = [0.0 if t in free else 1.0 for t in self.task_names]
        self.register_buffer(
            "query_session_gate", torch.tensor(use_sess).unsqueeze(-1), persistent=False
        )

    # -- the two halves ---------------------------------------------------------------------------
    def encode(self, batch: Mapping[str, Tensor], *, detach_units: bool = False) -> Tensor:
        """Tokens -> cross-attention -> self-attention stack: latents ``[B, L, D]``.

        ``detach_units``: the unit embedding rows enter as constants (same values, no gradient)."""
        values = batch["values"]
        unit_index = batch["unit_index"]
        mask = batch["mask"]
        b = values.shape[0]
        loc = self.unit_loc[unit_index].unsqueeze(-1)
        scale = self.unit_scale[unit_index].unsqueeze(-1)
        x = (values - loc) / scale
        emb = self.unit_emb(unit_index)
        if detach_units:
            emb = emb.detach()
        d = self.config.dim
        # token = e_u + (1 + g_u) * f(x): the gain lets each cell weigh its own response
        tokens = emb[..., :d] + (1.0 + emb[..., d:]) * self.value_emb(x)
        if self.stats_proj is not None or self.pop_proj is not None:
            s = scale.squeeze(-1)
            stats = torch.stack([torch.log(s), loc.squeeze(-1) / s], dim=-1)  # [B, N, 2]
        if self.stats_proj is not None:
            tokens = tokens + self.stats_proj(stats)
        tok_pos = self.rotary_emb(batch["timestamps"])

        latents = self.latent_emb(self.latent_index).unsqueeze(0).expand(b, -1, -1)
        lat_pos = self.rotary_emb(self.latent_timestamps).unsqueeze(0).expand(b, -1, -1)

        latents = latents + self.enc_atn(latents, tokens, lat_pos, tok_pos, mask)
        if self.direct_proj is not None or self.pop_proj is not None:
            m = mask.unsqueeze(-1).to(x.dtype)
        if self.direct_proj is not None:
            direct = self.direct_proj(emb) * x.mean(-1, keepdim=True) * m  # [B, N, D]
            latents = latents + (direct.sum(1) / m.sum(1).clamp_min(1.0)).unsqueeze(1)
        if self.pop_proj is not None:
            pop = (stats * m).sum(1) / m.sum(1).clamp_min(1.0)  # [B, 2]
            latents = latents + self.pop_proj(pop).unsqueeze(1)
        latents = latents + self.enc_ffn(latents)
        for self_attn, ffn in self.proc_layers:
            latents = latents + self.dropout(self_attn(latents, lat_pos))
            latents = latents + self.dropout(ffn(latents))
        return latents

    def readout(self, latents: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Output queries (session + task embedding, at the window end) -> logits per task."""
        b = latents.shape[0]
        n_tasks = len(self.task_names)
        task_index = torch.arange(n_tasks, device=latents.device)
        queries = self.session_emb(batch["session_index"]).unsqueeze(1) * self.query_session_gate
        queries = queries + self.task_emb(task_index).unsqueeze(0)  # [B, T, D]
        q_t = torch.full((n_tasks,), self.config.window_s, device=latents.device)
        q_pos = self.rotary_emb(q_t).unsqueeze(0).expand(b, -1, -1)
        lat_pos = self.rotary_emb(self.latent_timestamps).unsqueeze(0).expand(b, -1, -1)
        out = queries + self.dec_atn(queries, latents, q_pos, lat_pos)
        out = out + self.dec_ffn(out)
        out = self.dropout(self.out_norm(out))
        return {t: self.heads[t](out[:, i]) for i, t in enumerate(self.task_names)}

    def forward(
        self,
        values: Tensor,
        unit_index: Tensor,
        timestamps: Tensor,
        mask: Tensor,
        session_index: Tensor,
        *,
        blind: bool = False,
    ) -> dict[str, Tensor]:
        """Logits per task. ``blind=True`` (training): the `identity_blind_tasks` take their
        logits from a second pass with the unit embeddings detached (their queries leave out the
        session embedding), so their loss reaches only the shared weights; every value is the
        same as without it (dropout aside)."""
        batch = {
            "values": values,
            "unit_index": unit_index,
            "timestamps": timestamps,
            "mask": mask,
            "session_index": session_index,
        }
        out = self.readout(self.encode(batch), batch)
        blind_tasks = [t for t in self.config.identity_blind_tasks if t in out] if blind else []
        if blind_tasks:
            cut = self.readout(self.encode(batch, detach_units=True), batch)
            out.update({t: cut[t] for t in blind_tasks})
        return out

    def forward_batch(
        self, batch: Mapping[str, Tensor], *, blind: bool = False
    ) -> dict[str, Tensor]:
        return self(*(batch[k] for k in BATCH_KEYS), blind=blind)

    @torch.no_grad()
    def init_unit_rows(self, rows: Tensor) -> None:
        """Initial unit embeddings: random additive part, gain part around 0 (gain 1)."""
        d = self.config.dim
        nn.init.normal_(rows[:, :d], std=self.config.unit_init_scale)
        nn.init.normal_(rows[:, d:], std=self.config.unit_init_scale)

    # -- vocabulary growth ------------------------------------------------------------------------
    @torch.no_grad()
    def grow(self, n_units: int, n_sessions: int) -> None:
        """Enlarge the unit and session tables (new rows: small random / mean of the old)."""
        c = self.config
        if n_units > c.n_units:
            old = self.unit_emb.weight
            new = nn.Embedding(n_units, 2 * c.dim).to(old.device)
            self.init_unit_rows(new.weight)
            new.weight[: c.n_units] = old
            self.unit_emb = new
            self.unit_loc = torch.cat([self.unit_loc, self.unit_loc.new_zeros(n_units - c.n_units)])
            self.unit_scale = torch.cat(
                [self.unit_scale, self.unit_scale.new_ones(n_units - c.n_units)]
            )
        if n_sessions > c.n_sessions:
            old = self.session_emb.weight
            new = nn.Embedding(n_sessions, c.dim).to(old.device)
            new.weight[:] = old.mean(0, keepdim=True)
            new.weight[: c.n_sessions] = old
            self.session_emb = new
        self.config = c.model_copy(
            update={"n_units": max(n_units, c.n_units), "n_sessions": max(n_sessions, c.n_sessions)}
        )


def batch_to_torch(batch: Mapping[str, object], device: str | torch.device = "cpu") -> dict:
    """Numpy batch (from `collate`) -> torch tensors."""
    return {k: torch.as_tensor(batch[k]).to(device) for k in BATCH_KEYS}
