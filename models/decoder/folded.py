"""`FoldedDecoder`: the trained `Decoder`'s inference arithmetic with its constants folded.

The same function as ``Decoder.encode`` / ``Decoder.readout`` in eval mode (equal up to float
rounding; `models.export` checks ORT against the unfolded decoder on every export), rewritten so
that an exported ONNX graph has few, large nodes instead of many small ones:

- Everything that depends only on the unit index is a table: the unit's additive embedding
  (plus its statistics feature, ``unit_stats_input``), its gain, the direct path's projection
  of its embedding, its normalisation offset and inverse scale; one gather each.
- Rotary embeddings (torch_brain's interleaved pairs, ``x * cos + rotate_half(x) * sin``):
  ``rotate_half`` is a fixed linear map, so it is folded into the projection weights. Where the
  positions are constant (latent tokens, output queries) the rotation itself is folded into the
  weights or into per-position constants; only the input tokens' positions come from the batch,
  and for them the cosine and sine are computed on the distinct frequencies only and broadcast.
- The encoder's queries (the learned latents) do not depend on the input: their normalised,
  projected, rotated and scaled values are a constant. Its output side (per-head value selection,
  inverse rotation at each latent's position, output projection) is one matrix per latent.
- ``patch`` windows (``shared_time``, the default for the patch tokenizer): every token of a
  window carries the same time (the tokenizer gives each cell's token the window's end), so the
  tokens' rotation is one per window. It then moves off the tokens: keys
  ``((h Pk) * f) Q = h (Pk diag(f) Q)``, one [D, H*L] matrix per window, and values
  ``softmax(s) ((h Pv) * f) = ((softmax(s) h) Pv) * f``; per token that is two D x H*L products
  instead of two D x 2*inner projections, a cosine spread and a score product (~4x fewer
  multiply-adds per token for the default sizes). The window's time is read from its tokens
  (the latest unmasked one), so the result is exact for any windows whose tokens share a time.
- Latents (constant positions) are carried latent-major ([L, B, D]) through the encoder's output
  and the processor, so that every per-latent matrix is one batched product over the L latents:
  the encoder's output side, each processor layer's projection with its latent's rotation
  folded in ([L, D, 3 * inner]: no cosine / sine products) and its output with the rotation
  back folded in ([L, inner, D]).
- Readout: the keys' rotation is folded per latent ([L, D, inner]); values and output
  projection are one [H * D, D] matrix (``(a_h LN(x)) (Wv_h Wo_h)`` summed over heads), applied
  to the attention-weighted latents, so no value vectors are formed. This matters most for
  attributions, where every window goes through the readout M + 1 times.

It holds copies of the weights it needs (buffers, no parameters): build it from a trained
decoder, use it for inference and export, never train it. Only the `Decoder` is saved.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch_brain.nn import RotaryTimeEmbedding

from models.decoder.model import BATCH_KEYS, Decoder


def _half_turn(dim_head: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``Rh`` with ``rotate_half(x) == x @ Rh`` for one head (torch_brain's pair layout)."""
    return RotaryTimeEmbedding._rotate_half(torch.eye(dim_head, dtype=dtype))


def _rotation(emb: Tensor, dim_head: int) -> Tensor:
    """``[n, dh, dh]`` matrices ``M`` with ``rotate(x, emb) == x @ M`` for each of ``n``
    rotary embeddings ``emb [n, 2 * dh]`` (``RotaryTimeEmbedding.forward`` output)."""
    cos, sin = emb.chunk(2, dim=-1)
    rh = _half_turn(dim_head, emb.dtype)
    return torch.diag_embed(cos) + rh[None] * sin[:, None, :]


def _block_diag(m: Tensor, heads: int) -> Tensor:
    """``[..., dh, dh]`` -> ``[..., H*dh, H*dh]``, the same block on every head."""
    dh = m.shape[-1]
    out = m.new_zeros(*m.shape[:-2], heads * dh, heads * dh)
    for h in range(heads):
        out[..., h * dh : (h + 1) * dh, h * dh : (h + 1) * dh] = m
    return out


def _latent_rotations(dec: Decoder, heads: int, *, back: bool = False) -> Tensor:
    """``[L, heads * dh, heads * dh]``: each latent's rotation (``back``: by minus its position)
    on every head, so that a projection ``W`` followed by it is the one matrix ``W @ R_l``."""
    emb = dec.rotary_emb(dec.latent_timestamps)
    if back:
        emb = RotaryTimeEmbedding.invert(emb)
    return _block_diag(_rotation(emb, dec.config.dim_head), heads)


def _pairs(dec: Decoder) -> tuple[Tensor, Tensor]:
    """Indices of the head's rotated pairs (frequency > 0) and of the pairs kept as they are."""
    omega = dec.rotary_emb.omega.detach()  # [dh / 2], one per pair
    return torch.nonzero(omega != 0).flatten(), torch.nonzero(omega == 0).flatten()


def _layer_norm(ln: nn.LayerNorm, x: Tensor) -> Tensor:
    return nn.functional.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


class FoldedDecoder(nn.Module):
    """Inference-only twin of a trained `Decoder` (see the module docstring).

    ``encode(batch)`` and ``readout(latents, batch)`` take and return what the decoder's do.
    ``shared_time`` (default: the checkpoint's tokenizer is ``patch``): the tokens of a window
    share one time (see the module docstring); False computes every token's own rotation."""

    def __init__(self, decoder: Decoder, shared_time: bool | None = None):
        super().__init__()
        # fold in float64 (constants rounded once, at the end), on private copies of the weights
        dtype = next(decoder.parameters()).dtype
        dec = copy.deepcopy(decoder).double().eval()
        c = dec.config
        self.config = c
        self.task_names = dec.task_names
        self.dim_head = c.dim_head
        if shared_time is None:
            shared_time = c.tokenizer == "patch"
        if shared_time and c.tokenizer != "patch":
            raise ValueError(
                f"shared_time needs patch windows; {c.tokenizer} tokens carry frame times"
            )
        self.shared_time = bool(shared_time)
        with torch.no_grad():
            self._fold_tokens(dec)
            self._fold_encoder(dec)
            self.layers = nn.ModuleList(_FoldedSelfAttention(dec, a, f) for a, f in dec.proc_layers)
            self._fold_readout(dec)
        self.to(dtype)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    # -- construction -----------------------------------------------------------------------------
    def _fold_tokens(self, dec: Decoder) -> None:
        c = dec.config
        d = c.dim
        emb = dec.unit_emb.weight.detach()
        add = emb[:, :d].clone()
        s = dec.unit_scale
        stats = torch.stack([torch.log(s), dec.unit_loc / s], dim=-1)
        if dec.stats_proj is not None:
            add = add + dec.stats_proj(stats)
        self.register_buffer("unit_add", add)
        self.register_buffer("unit_gain", 1.0 + emb[:, d:])
        self.register_buffer("unit_loc", dec.unit_loc.detach().clone().unsqueeze(-1))
        self.register_buffer("unit_inv_scale", (1.0 / dec.unit_scale.detach()).unsqueeze(-1))
        self.value_emb = dec.value_emb
        self.direct = dec.direct_proj is not None
        if self.direct:
            self.register_buffer("unit_direct", dec.direct_proj(emb))
        # population statistics: the mean over cells of W s_u, then + b
        self.population = dec.pop_proj is not None
        if self.population:
            self.register_buffer("unit_pop", stats @ dec.pop_proj.weight.T)
            self.register_buffer("pop_bias", dec.pop_proj.bias.detach().clone())
        # distinct rotary frequencies (pairs with omega 0 are not rotated)
        rot, _ = _pairs(dec)
        self.register_buffer("omega", dec.rotary_emb.omega.detach()[rot].clone())

    def _fold_encoder(self, dec: Decoder) -> None:
        """Token projection with rotate_half folded in; constant queries; output per latent."""
        c = dec.config
        atn = dec.enc_atn
        if not atn.rotate_value:
            raise NotImplementedError("the encoder's values are rotated in every Decoder")
        d, dh, heads = c.dim, c.dim_head, atn.heads
        inner = heads * dh
        rot, keep = _pairs(dec)
        self.enc_norm_context = atn.norm_context
        w_k, w_v = atn.to_kv.weight.detach().split(inner, dim=0)  # [inner, D] each
        # keys and values get the same column layout, so one factor tensor serves both
        k_side = _RotaryColumns([w_k[h * dh : (h + 1) * dh] for h in range(heads)], rot, keep)
        v_side = _RotaryColumns([w_v[h * dh : (h + 1) * dh] for h in range(heads)], rot, keep)
        self.register_buffer("enc_proj_k", k_side.proj)
        self.register_buffer("enc_proj_v", v_side.proj)
        self.register_buffer("enc_spread", k_side.spread)
        # one cosine gives the factors: cos(t w) | cos(0 t) = 1 | cos(t w - pi / 2) = sin(t w)
        w = self.omega
        self.register_buffer("enc_freq", torch.cat([w, w.new_zeros(1), w]))
        self.register_buffer(
            "enc_phase", torch.cat([w.new_zeros(w.numel() + 1), w.new_full(w.shape, -math.pi / 2)])
        )

        # queries: the learned latents, normalised, projected, rotated at their positions, scaled
        lat = dec.latent_emb.weight.detach()  # latent_index is arange(L)
        n_lat = lat.shape[0]
        q = atn.to_q(atn.norm(lat)).reshape(n_lat, heads, dh)  # [L, H, dh]
        lat_rot = _rotation(dec.rotary_emb(dec.latent_timestamps), dh)  # [L, dh, dh]
        q = torch.einsum("lhd,lde->hle", q, lat_rot) / math.sqrt(dh)  # [H, L, dh]
        q_mat = lat.new_zeros(k_side.n_cols, heads * n_lat)
        for h in range(heads):  # key head h, latents h*L ... h*L + L - 1
            rows = k_side.col_head == h
            q_mat[rows, h * n_lat : (h + 1) * n_lat] = q[h][:, k_side.col_dim[rows]].T
        self.register_buffer("enc_queries", k_side.join @ q_mat)  # [n_proj, H * L]
        # output: per latent i, sum over heads of O[h, i] @ Sel_h @ M(-t_i) @ Wo_h^T
        inv_rot = _rotation(RotaryTimeEmbedding.invert(dec.rotary_emb(dec.latent_timestamps)), dh)
        w_o = atn.to_out.weight.detach().T  # [inner, D]
        out = lat.new_zeros(n_lat, heads, v_side.n_cols, d)
        for h in range(heads):
            sel = lat.new_zeros(v_side.n_cols, dh)
            rows = torch.nonzero(v_side.col_head == h).flatten()  # value head h
            sel[rows, v_side.col_dim[rows]] = 1.0
            w_oh = w_o[h * dh : (h + 1) * dh]
            out[:, h] = torch.einsum("cd,lde,ef->lcf", sel, inv_rot, w_oh)
        out = torch.einsum("pc,lhcd->lhpd", v_side.join, out)  # [L, H, n_proj, D]
        self.register_buffer("enc_out", out.reshape(n_lat, heads * v_side.n_proj, d))
        self.register_buffer("enc_out_bias", atn.to_out.bias.detach().clone())
        self.enc_heads = heads
        self.register_buffer("latents0", lat.clone())
        self.enc_ffn = dec.enc_ffn

    def _fold_readout(self, dec: Decoder) -> None:
        c = dec.config
        atn = dec.dec_atn
        dh, heads = c.dim_head, atn.heads
        inner = heads * dh
        n_tasks = len(self.task_names)
        self.session_emb = dec.session_emb
        self.register_buffer("query_gate", dec.query_session_gate.detach().clone())
        self.register_buffer("task_queries", dec.task_emb.weight.detach().clone())
        self.dec_norm = atn.norm
        self.dec_norm_context = atn.norm_context
        # queries at the window end: rotation and scale folded into to_q
        q_emb = dec.rotary_emb(torch.tensor([c.window_s], dtype=torch.float64))
        q_rot = _block_diag(_rotation(q_emb, dh)[0], heads)  # [inner, inner]
        self.register_buffer("dec_q", (atn.to_q.weight.detach().T @ q_rot) / math.sqrt(dh))
        # keys at the latents' positions, one matrix per latent: Wk @ R_l [L, D, inner]
        w_k, w_v = atn.to_kv.weight.detach().T.split(inner, dim=1)  # [D, inner] each
        self.register_buffer("dec_k", (w_k @ _latent_rotations(dec, heads)).contiguous())
        # heads without transposes: 1 on a head's own dims [H, 1, inner]
        mask = torch.zeros(heads, 1, inner, dtype=w_k.dtype)
        for h in range(heads):
            mask[h, 0, h * dh : (h + 1) * dh] = 1.0
        self.register_buffer("dec_head_mask", mask)
        if atn.rotate_value:
            raise NotImplementedError("the readout's values are not rotated in any Decoder")
        # values and output projection, per head: o_t = sum_h (a_ht @ LN(x)) @ (Wv_h Wo_h)
        w_o = atn.to_out.weight.detach().T  # [inner, D]
        w_vo = [w_v[:, h * dh : (h + 1) * dh] @ w_o[h * dh : (h + 1) * dh] for h in range(heads)]
        self.register_buffer("dec_vo", torch.cat(w_vo, dim=0).contiguous())  # [H * D, D]
        self.register_buffer("dec_out_bias", atn.to_out.bias.detach().clone())
        self.dec_heads = heads
        self.dec_ffn = dec.dec_ffn
        self.out_norm = dec.out_norm
        self.heads = dec.heads
        self.n_tasks = n_tasks

    # -- inference --------------------------------------------------------------------------------
    def encode(self, batch: Mapping[str, Tensor]) -> Tensor:
        values, unit_index, mask = batch["values"], batch["unit_index"], batch["mask"]
        b, n = unit_index.shape
        emb = nn.functional.embedding
        x = (values - emb(unit_index, self.unit_loc)) * emb(unit_index, self.unit_inv_scale)
        tokens = emb(unit_index, self.unit_add) + emb(unit_index, self.unit_gain) * self.value_emb(
            x
        )
        h = _layer_norm(self.enc_norm_context, tokens)
        if self.shared_time:  # one rotation per window, moved off the tokens
            ts = batch["timestamps"]  # the window's time: a selection (exact), not a mean
            t = torch.where(mask, ts, ts.new_full((), -1e30)).amax(1, keepdim=True)  # [B, 1]
            f = torch.cos(t * self.enc_freq + self.enc_phase) @ self.enc_spread  # [B, n_proj]
            keys = (self.enc_proj_k * f.unsqueeze(1)) @ self.enc_queries  # [B, D, H*L]
            scores = h @ keys  # [B, N, H*L]
        else:
            angles = batch["timestamps"].unsqueeze(-1) * self.enc_freq + self.enc_phase
            factors = torch.cos(angles) @ self.enc_spread  # [B, N, n_proj]
            scores = ((h @ self.enc_proj_k) * factors) @ self.enc_queries  # [B, N, H*L]
        scores = scores.transpose(1, 2).masked_fill(~mask.unsqueeze(1), float("-inf"))
        a = torch.softmax(scores, dim=-1)  # [B, H*L, N]
        if self.shared_time:
            o = ((a @ h) @ self.enc_proj_v) * f.unsqueeze(1)  # [B, H*L, n_proj]
        else:
            o = a @ ((h @ self.enc_proj_v) * factors)
        heads, n_lat = self.enc_heads, self.latents0.shape[0]
        # latent-major from here on ([L, B, D]): every per-latent matrix is one batched GEMM
        # over the L latents (B rows each) instead of B * L single-row products
        o = o.reshape(b, heads, n_lat, -1).permute(2, 0, 1, 3).reshape(n_lat, b, -1)
        latents = self.latents0.unsqueeze(1) + (o @ self.enc_out + self.enc_out_bias)
        if self.direct or self.population:
            m = mask.to(x.dtype)
            m = m / m.sum(1, keepdim=True).clamp_min(1.0)  # [B, N]
        if self.direct:
            w = x.mean(-1) * m
            latents = latents + (w.unsqueeze(1) @ emb(unit_index, self.unit_direct)).transpose(0, 1)
        if self.population:
            pop = m.unsqueeze(1) @ emb(unit_index, self.unit_pop)  # [B, 1, D]
            latents = latents + (pop + self.pop_bias).transpose(0, 1)
        latents = latents + self.enc_ffn(latents)
        for layer in self.layers:
            latents = layer(latents)
        return latents.transpose(0, 1)  # [B, L, D]

    def readout(self, latents: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """As ``Decoder.readout``; ``latents`` may also hold k variants of each window, rows
        variant-major (``Tensor.repeat`` order), with ``session_index`` given once per window:
        the output queries are then computed once per window and tiled."""
        b, n_lat, _ = latents.shape
        t = self.n_tasks
        sess = batch["session_index"]
        queries = self.session_emb(sess).unsqueeze(1) * self.query_gate
        queries = queries + self.task_queries  # [b, T, D]
        q = _layer_norm(self.dec_norm, queries) @ self.dec_q
        reps = b // sess.shape[0]
        queries, q = queries.repeat(reps, 1, 1), q.repeat(reps, 1, 1)
        heads, mask = self.dec_heads, self.dec_head_mask
        ln = _layer_norm(self.dec_norm_context, latents)  # [B, L, D]
        k = (ln.transpose(0, 1) @ self.dec_k).permute(1, 2, 0)  # [B, inner, L], rotated
        # each head's queries with the other heads' dims zeroed: one matmul for all heads
        q = (q.unsqueeze(1) * mask).reshape(b, heads * t, -1)  # [B, H*T, inner]
        a = torch.softmax(q @ k, dim=-1)  # [B, H*T, L]
        ctx = (a @ ln).reshape(b, heads, t, -1).transpose(1, 2).reshape(b, t, -1)  # [B, T, H*D]
        out = queries + (ctx @ self.dec_vo + self.dec_out_bias)
        out = out + self.dec_ffn(out)
        out = self.out_norm(out)
        return {name: self.heads[name](out[:, i]) for i, name in enumerate(self.task_names)}

    def forward(self, *inputs: Tensor) -> dict[str, Tensor]:
        """Inputs in `BATCH_KEYS` order, as ``Decoder.forward``; logits per task."""
        batch = dict(zip(BATCH_KEYS, inputs, strict=True))
        return self.readout(self.encode(batch), batch)


class _RotaryColumns:
    """A projection's output columns laid out for rotation by per-token positions.

    For heads' weights ``groups`` ([dh, D] each), the projection ``x @ proj`` gives, per head, the
    rotated pairs' first and second elements ([A | B], F columns each), their ``rotate_half``
    ([-B | A]) and the pairs that are not rotated (U). Multiplied by ``[cos(t w), 1, sin(t w)]
    @ spread`` and summed by ``join``, the columns are the rotated head vectors, in the order
    ``(col_head, col_dim)``; ``join`` is folded into whatever reads them."""

    def __init__(self, groups: list[Tensor], rot: Tensor, keep: Tensor):
        f, n_groups = int(rot.numel()), len(groups)
        a_rows = [g[2 * rot] for g in groups]
        b_rows = [g[2 * rot + 1] for g in groups]
        keep_dims = torch.stack([2 * keep, 2 * keep + 1], dim=1).flatten()
        w_ab = torch.cat(a_rows + b_rows)  # [2 G F, D]
        w_turn = torch.cat([-r for r in b_rows] + a_rows)
        w_u = torch.cat([g[keep_dims] for g in groups])
        self.proj = torch.cat([w_ab, w_turn, w_u]).T.contiguous()  # [D, n_proj]
        n_ab, n_u = int(w_ab.shape[0]), int(w_u.shape[0])
        self.n_proj = 2 * n_ab + n_u
        self.n_cols = n_ab + n_u
        # factors: rows [cos of each pair's angle | 1 | sin of each pair's angle]
        dt = w_ab.dtype
        self.spread = torch.zeros(2 * f + 1, self.n_proj, dtype=dt)
        for blk in range(2 * n_groups):  # [A | B] blocks of F columns
            for p in range(f):
                self.spread[p, blk * f + p] = 1.0
                self.spread[f + 1 + p, n_ab + blk * f + p] = 1.0
        self.spread[f, 2 * n_ab :] = 1.0
        self.join = torch.zeros(self.n_proj, self.n_cols, dtype=dt)
        self.join[torch.arange(n_ab), torch.arange(n_ab)] = 1.0
        self.join[n_ab + torch.arange(n_ab), torch.arange(n_ab)] = 1.0
        self.join[2 * n_ab + torch.arange(n_u), n_ab + torch.arange(n_u)] = 1.0
        head, dim = [], []
        for part in range(2):  # A then B
            for g in range(n_groups):
                head += [g] * f
                dim += (2 * rot + part).tolist()
        for g in range(n_groups):
            head += [g] * int(keep_dims.numel())
            dim += keep_dims.tolist()
        self.col_head, self.col_dim = torch.tensor(head), torch.tensor(dim)


class _FoldedSelfAttention(nn.Module):
    """One processor layer (self-attention at the latents' constant positions, then FFN), on
    latent-major latents [L, B, D]: each latent's rotation is folded into its own projection
    ([L, D, 3 * inner], the attention scale on the queries) and the rotation of its output back
    by its own position into its own output matrix ([L, inner, D])."""

    def __init__(self, dec: Decoder, atn: nn.Module, ffn: nn.Module):
        super().__init__()
        if not atn.rotate_value:
            raise NotImplementedError("the processor's values are rotated in every Decoder")
        c = dec.config
        dh, heads = c.dim_head, atn.heads
        self.heads, self.dim_head = heads, dh
        self.norm = atn.norm
        w = atn.to_qkv.weight.detach().T.clone()  # [D, 3 inner]: q | k | v
        inner = heads * dh
        w[:, :inner] /= math.sqrt(dh)  # the attention scale, on the queries
        # q, k and v each rotated at the latent's position: W @ R_l [L, D, 3 inner]
        self.register_buffer("proj", (w @ _latent_rotations(dec, 3 * heads)).contiguous())
        # back by each latent's own position, then the output projection [L, inner, D]
        back = _latent_rotations(dec, heads, back=True)
        self.register_buffer("out", (back @ atn.to_out.weight.detach().T).contiguous())
        self.register_buffer("out_bias", atn.to_out.bias.detach().clone())
        self.ffn = ffn

    def forward(self, x: Tensor) -> Tensor:
        n, b, _ = x.shape  # [L, B, D]
        heads, dh = self.heads, self.dim_head
        qkv = _layer_norm(self.norm, x) @ self.proj  # [L, B, 3 inner], rotated
        q, k, v = qkv.reshape(n, b, 3, heads, dh).permute(2, 1, 3, 0, 4)  # [B, H, L, dh] each
        a = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        o = (a @ v).permute(2, 0, 1, 3).reshape(n, b, heads * dh)  # [L, B, inner]
        x = x + (o @ self.out + self.out_bias)
        return x + self.ffn(x)
