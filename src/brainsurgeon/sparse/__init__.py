"""Sparse storage (CSR, delta-coded, packed N:M in safetensors) and sparse CPU inference for pruned models."""
from .convert import to_sparse
from .hf_dir import export_dense
from .modules import SparseConv2d, SparseLinear, SparseModule
from .storage import load, save

__all__ = ["save", "load", "to_sparse", "export_dense", "SparseLinear", "SparseConv2d", "SparseModule"]
