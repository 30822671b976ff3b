"""The attention backends: VTN's encoder (the Longformer layer stack), one module class per backend, by name.

A backend class is built as `cls(hidden_size, num_heads, intermediate_size, windows, dropout, attention_dropout)`
(one layer per window) and called as `(h, valid, return_attention) -> (h, attentions)`: h [B, 1 + T, d] the
embedded tokens with [CLS] first (global), valid [B, 1 + T] bool; it returns the last hidden states and, per
layer, [CLS]'s attention [B, H, 1 + T] (None allowed when not asked for). `set_grad_checkpointing(on)` recomputes
each layer's activations in the backward pass instead of keeping them. Every backend names its parameters as
transformers' LongformerModel does (`encoder.layer.{i}...`) and computes the same function, so a checkpoint
loads into any of them; tests/temporal/test_model.py holds each to the `hf` reference.

A new backend: its module, and one line in BACKENDS. Entries are import paths so that a backend's dependencies
load only when it is built (transformers is slow to import and only `hf` needs it).
"""

from __future__ import annotations

import importlib

from vtn.config import ConfigError

BACKENDS = {
    "fast": "vtn.temporal.longformer:FastLongformer",  # exact, no host syncs; traces under torch.compile
    "hf": "vtn.temporal.hf:HFLongformer",  # transformers' LongformerModel, the reference
}


def check_backend(name: str) -> None:
    """Refuse a backend name that is not registered."""
    if name not in BACKENDS:
        raise ConfigError(f"backend: {name!r} is not one of {list(BACKENDS)}")


def backend_class(name: str) -> type:
    """The module class of the backend `name` (its module imported now)."""
    check_backend(name)
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)
