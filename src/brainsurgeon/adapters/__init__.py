"""Adapters: what brainsurgeon needs to know about model families it does not define itself.

:mod:`brainsurgeon.adapters.hf` holds every piece of Hugging Face transformers knowledge (block
lists, attention/MLP layouts, GPT-2's ``Conv1D``, token batches, the model's own loss); nothing
else in the package names a transformers class. Importing it does not import transformers.
"""
from .hf import (
    AttentionLayout,
    BlockLayout,
    HFAdapter,
    MLPLayout,
    TokenView,
    is_hf_model,
    token_batches,
)

__all__ = ["AttentionLayout", "BlockLayout", "HFAdapter", "MLPLayout", "TokenView", "is_hf_model", "token_batches"]
