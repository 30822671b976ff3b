"""The `hf` backend: transformers' LongformerModel, the reference the `fast` backend is tested against.

VTN embeds the tokens itself (input projection, [CLS], positions, LayerNorm), so LongformerModel's own
embeddings (word, position and token-type tables, LayerNorm, dropout) are replaced by a pass-through:
`inputs_embeds` reach the encoder unchanged and both backends compute the same function with the same
parameter names (`encoder.layer.{i}...`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LongformerConfig, LongformerModel

from vtn.temporal.longformer import LAYER_NORM_EPS


class PassThroughEmbeddings(nn.Module):
    """Stands in for LongformerEmbeddings: returns `inputs_embeds` as given (VTN has already embedded them)."""

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            raise ValueError("the hf backend is driven with inputs_embeds only")
        return inputs_embeds


class HFLongformer(LongformerModel):
    """A LongformerModel with one layer per window, no pooler and pass-through embeddings, called as every
    backend is (temporal/attention.py)."""

    # Driven with embedded tokens, so gradient checkpointing has no input embeddings to hook.
    main_input_name = "inputs_embeds"

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, windows: tuple[int, ...],
                 dropout: float, attention_dropout: float):
        config = LongformerConfig(
            hidden_size=hidden_size,
            num_hidden_layers=len(windows),
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            attention_window=list(windows),
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=attention_dropout,
            layer_norm_eps=LAYER_NORM_EPS,
            hidden_act="gelu",
            # The token tables are discarded below; keep them tiny while they exist.
            vocab_size=1,
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=None,
            sep_token_id=None,
            max_position_embeddings=1,
            type_vocab_size=1,
        )
        super().__init__(config, add_pooling_layer=False)
        self.embeddings = PassThroughEmbeddings()

    def forward(
        self, h: torch.Tensor, valid: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Run LongformerModel on embedded tokens h [B, 1 + T, d] ([CLS] first, global) with valid [B, 1 + T].

        We pad to a multiple of every layer's window ourselves (HF pads to the largest window only, which breaks
        when the windows do not divide each other, and would build the padding through its embeddings).
        Returns the hidden states [B, 1 + T, d] and, if asked, [CLS]'s attention per layer [B, H, 1 + T].
        """
        B, N, _ = h.shape
        multiple = math.lcm(*self.config.attention_window)
        pad = -N % multiple
        h = F.pad(h, (0, 0, 0, pad))  # [B, N + pad, d]
        attention_mask = F.pad(valid.long(), (0, pad))  # [B, N + pad]: 1 attend, 0 padding
        global_attention_mask = torch.zeros_like(attention_mask)
        global_attention_mask[:, 0] = 1  # [CLS]
        out = super().forward(
            inputs_embeds=h,
            attention_mask=attention_mask,
            global_attention_mask=global_attention_mask,
            output_attentions=return_attention,
        )
        hidden = out.last_hidden_state[:, :N]
        if not return_attention:
            return hidden, None
        # global_attentions: per layer [B, H, N + pad, num_global=1]
        return hidden, [a[:, :, :N, 0] for a in out.global_attentions]

    def set_grad_checkpointing(self, on: bool = True) -> None:
        if on:
            self.gradient_checkpointing_enable({"use_reentrant": False})
        else:
            self.gradient_checkpointing_disable()
