"""Curvature statistics of the loss: per-sample vectors, diagonals, Kronecker factors, inverses."""
