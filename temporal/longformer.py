"""The `fast` Longformer: exact sliding-window + [CLS] global attention, without Hugging Face's overheads.

It computes the same function as transformers' `LongformerModel` encoder (post-LayerNorm BERT layers whose
self-attention is Longformer's) for the one pattern VTN uses: a single global token, [CLS], at index 0.
Token i (a frame) attends to [CLS] and to the frames j with |i - j| <= w/2 (w = the layer's window, the
Hugging Face meaning), through the `query`/`key`/`value` projections; [CLS] attends to every token through
the separate `query_global`/`key_global`/`value_global` projections. Masked (padding) tokens are never
attended to. Module and parameter names mirror `LongformerModel.encoder`, so one state dict loads into
either backend.

What it skips: Hugging Face pads the sequence to a multiple of the largest window (a 16-frame clip with
w = 256 runs as 256 tokens), gathers global indices with `nonzero` and branches on `.item()` (host syncs),
and builds the band with strided views. Here the frames are cut into blocks of `c >= w/2` queries; each
block attends to its own and its two neighbouring blocks (plus [CLS]) through one batched
`scaled_dot_product_attention` call with an exact |i - j| <= w/2 mask, so time and memory are O(T * w).
A sequence that fits in one block runs as dense masked attention. Everything is decided by shapes, never by
tensor values, so it traces under torch.compile and torch.export.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Hugging Face's LongformerConfig default, kept so both backends compute the same function.
LAYER_NORM_EPS = 1e-12

# Smallest block of queries. A block of c >= r queries scores 1 + 3c keys per query where 2r + 2 are needed
# ([CLS] and the band), so blocks near r waste little; below ~16 rows the batched matmuls get too small to
# run efficiently.
MIN_BLOCK = 16


def block_size(num_frames: int, radius: int) -> int:
    """Queries per block: all frames when they fit in one block (dense), else max(radius, MIN_BLOCK)."""
    c = max(radius, MIN_BLOCK)
    return num_frames if num_frames <= 2 * c else c


def banded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, radius: int, dropout_p: float,
    dense: bool = False,
) -> torch.Tensor:
    """Each frame attends to [CLS] (key/value index 0) and to the valid frames within `radius` of it. `dense`: as
    one block whatever the length (the same function; a graph exported with a dynamic length has no branch on it).

    q: [B, H, T, dh] frame queries, already scaled; k, v: [B, H, 1 + T, dh] with [CLS] first;
    valid: [B, T] bool for the frames. Returns [B, H, T, dh].
    """
    B, H, T, dh = q.shape
    c = T if dense else block_size(T, radius)
    nb = 1 if dense else -(-T // c)  # number of query blocks
    halo = 1 if nb > 1 else 0  # neighbouring blocks on each side; c >= radius, so one suffices
    span = (2 * halo + 1) * c  # frame keys seen by one block

    if nb == 1:  # one block: dense attention over [CLS] + all frames, masked to the band
        t = torch.arange(T, device=q.device)
        mask = ((t[:, None] - t[None, :]).abs() <= radius) & valid[:, None, :]  # [B, T, T]
        mask = F.pad(mask, (1, 0), value=True).unsqueeze(1)  # [B, 1, T, 1 + T]; [CLS] always visible
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=1.0)

    k_cls, k_frames = k[:, :, :1], k[:, :, 1:]  # [B, H, 1, dh], [B, H, T, dh]
    v_cls, v_frames = v[:, :, :1], v[:, :, 1:]

    # Queries: pad T up to nb * c, then cut into blocks.
    qb = F.pad(q, (0, 0, 0, nb * c - T))  # [B, H, nb*c, dh]
    qb = qb.view(B, H, nb, c, dh).transpose(1, 2)  # [B, nb, H, c, dh]
    qb = qb.reshape(B * nb, H, c, dh)

    # Keys/values: pad halo * c in front and to (nb + halo) * c behind, then take overlapping windows of `span`
    # frames with step c: window b covers frames [(b - halo) * c, (b + 1 + halo) * c).
    def windows(x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, halo * c, (nb + halo) * c - T))  # [B, H, (nb + 2*halo)*c, dh]
        x = x.unfold(2, span, c)  # [B, H, nb, dh, span]
        x = x.permute(0, 2, 1, 4, 3)  # [B, nb, H, span, dh]
        cls = cls.unsqueeze(1).expand(B, nb, H, 1, dh)  # [B, nb, H, 1, dh]
        return torch.cat([cls, x], dim=3).reshape(B * nb, H, 1 + span, dh)

    kb, vb = windows(k_frames, k_cls), windows(v_frames, v_cls)

    # Mask: query x of block b is frame b*c + x; key y of its window is frame (b - halo)*c + y, so their distance
    # is halo*c + x - y whatever b is. Frames outside [0, T) and padding are invalid keys.
    x = torch.arange(c, device=q.device)
    y = torch.arange(span, device=q.device)
    band = (halo * c + x[:, None] - y[None, :]).abs() <= radius  # [c, span]
    key_valid = F.pad(valid, (halo * c, (nb + halo) * c - T), value=False)  # [B, (nb + 2*halo)*c]
    key_valid = key_valid.unfold(1, span, c)  # [B, nb, span]
    mask = band & key_valid[:, :, None, :]  # [B, nb, c, span]
    # [CLS] is always visible, so no row is empty (no NaN from an all-masked softmax).
    mask = F.pad(mask, (1, 0), value=True)  # [B, nb, c, 1 + span]
    mask = mask.reshape(B * nb, 1, c, 1 + span)

    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p, scale=1.0)
    out = out.view(B, nb, H, c, dh).transpose(1, 2)  # [B, H, nb, c, dh]
    return out.reshape(B, H, nb * c, dh)[:, :, :T]


def global_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] attends to every valid token (itself included).

    q: [B, H, 1, dh] its global query, already scaled; k, v: [B, H, N, dh] the global keys/values of all
    tokens; valid: [B, N] bool. Returns the output [B, H, 1, dh] and the probabilities [B, H, N].
    """
    scores = (q @ k.transpose(-1, -2)).squeeze(2)  # [B, H, N]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).type_as(scores)  # fp32 softmax, as HF
    return F.dropout(probs, dropout_p, dropout_p > 0).unsqueeze(2) @ v, probs


class LongformerSelfAttention(nn.Module):
    """Sliding-window attention for frames and global attention for [CLS] (index 0); HF's parameter names."""

    def __init__(self, hidden_size: int, num_heads: int, window: int, attention_dropout: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.radius = window // 2
        self.dropout = attention_dropout
        self.one_block = False  # every length as one dense block (see banded_attention); set for an exported graph
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.query_global = nn.Linear(hidden_size, hidden_size)
        self.key_global = nn.Linear(hidden_size, hidden_size)
        self.value_global = nn.Linear(hidden_size, hidden_size)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, d] -> [B, H, N, dh]."""
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, h: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: [B, 1 + T, d] with [CLS] first; valid: [B, 1 + T] bool ([CLS] valid).

        Returns the attention output [B, 1 + T, d] and [CLS]'s attention probabilities [B, H, 1 + T].
        """
        B, N, d = h.shape
        p = self.dropout if self.training else 0.0
        scale = math.sqrt(self.head_dim)

        # Frames: HF scales the queries before the product; so do we (and pass scale=1 to SDPA).
        q = self.heads(self.query(h[:, 1:]) / scale)  # [B, H, T, dh]; [CLS]'s local query would be unused
        k, v = self.heads(self.key(h)), self.heads(self.value(h))  # [B, H, N, dh]
        frames = banded_attention(q, k, v, valid[:, 1:], self.radius, p, self.one_block)  # [B, H, T, dh]

        # [CLS]: its own projections over all tokens (itself included), masked tokens excluded.
        qg = self.heads(self.query_global(h[:, :1]) / scale)  # [B, H, 1, dh]
        kg, vg = self.heads(self.key_global(h)), self.heads(self.value_global(h))  # [B, H, N, dh]
        cls, probs = global_attention(qg, kg, vg, valid, p)

        out = torch.cat([cls, frames], dim=2)  # [B, H, N, dh]
        return out.transpose(1, 2).reshape(B, N, d), probs


class LongformerSelfOutput(nn.Module):
    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class LongformerAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, window: int, dropout: float, attention_dropout: float):
        super().__init__()
        self.self = LongformerSelfAttention(hidden_size, num_heads, window, attention_dropout)
        self.output = LongformerSelfOutput(hidden_size, dropout)

    def forward(self, h: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, probs = self.self(h, valid)
        return self.output(a, h), probs


class LongformerIntermediate(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # HF's "gelu" is the exact (erf) GELU


class LongformerOutput(LongformerSelfOutput):
    def __init__(self, intermediate_size: int, hidden_size: int, dropout: float):
        super().__init__(hidden_size, dropout)
        self.dense = nn.Linear(intermediate_size, hidden_size)


class LongformerLayer(nn.Module):
    """Post-LayerNorm transformer layer: attention, residual + LN, FFN, residual + LN."""

    def __init__(self, hidden_size, num_heads, intermediate_size, window, dropout, attention_dropout):
        super().__init__()
        self.attention = LongformerAttention(hidden_size, num_heads, window, dropout, attention_dropout)
        self.intermediate = LongformerIntermediate(hidden_size, intermediate_size)
        self.output = LongformerOutput(intermediate_size, hidden_size, dropout)

    def forward(self, h: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, probs = self.attention(h, valid)
        return self.output(self.intermediate(a), a), probs


class LongformerEncoder(nn.Module):
    def __init__(self, layers: list[LongformerLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class FastLongformer(nn.Module):
    """The `fast` backend (temporal/attention.py): the layer stack, named like `LongformerModel`
    (`encoder.layer.{i}...`) so state dicts are shared."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, windows: tuple[int, ...],
                 dropout: float, attention_dropout: float):
        super().__init__()
        self.encoder = LongformerEncoder(
            [LongformerLayer(hidden_size, num_heads, intermediate_size, w, dropout, attention_dropout) for w in windows]
        )
        # Activation checkpointing (end-to-end fine-tuning): each layer's activations are recomputed in the backward
        # pass, dropout replayed, instead of kept.
        self.grad_checkpointing = False

    def forward(
        self, h: torch.Tensor, valid: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """h: [B, 1 + T, d] embedded tokens, [CLS] first; valid: [B, 1 + T] bool.

        Returns the last hidden states [B, 1 + T, d] and, per layer, [CLS]'s attention [B, H, 1 + T] (computed
        whether asked for or not: it is a by-product of [CLS]'s global attention).
        """
        attentions = []
        for layer in self.encoder.layer:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h, probs = checkpoint(layer, h, valid, use_reentrant=False)
            else:
                h, probs = layer(h, valid)
            attentions.append(probs)
        return h, attentions

    def set_grad_checkpointing(self, on: bool = True) -> None:
        self.grad_checkpointing = on
