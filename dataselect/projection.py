"""The random projection of gradients: per-layer Kronecker Rademacher factors, never a p × d matrix.

For a linear layer with weight W (out × in), a per-example gradient is G = Σ_t δ_t x_tᵀ (output
gradients times inputs). The layer's sketch is vec(P_outᵀ G P_in) with P_out (out × k_out) and
P_in (in × k_in) of i.i.d. ±1/√k entries and k_out · k_in = d, computed without forming G as
Σ_t (P_outᵀ δ_t)(P_inᵀ x_t)ᵀ (as LoGra does). The sketch of the whole gradient is the sum of the
layers' sketches: that is a projection by P = [P_in¹⊗P_out¹; P_in²⊗P_out²; …] (p × d) with
E[P Pᵀ] = I, so inner products are preserved in expectation (JL), while only the small factors
are ever stored. Each layer's split (k_out, k_in) keeps both factors as large as its shape allows.

Why not traker's projectors: `BasicProjector` materializes p × d blocks on every call and draws
them from the device's generator (different numbers on CPU and CUDA for the same seed); the
`fast_jl` CUDA projectors need a GPU and differ again. Here every factor entry is an integer hash
of (seed, layer, factor, row, column), computed with exact int64 arithmetic, so the same seed
gives the same factors on any device. The class keeps traker's `AbstractProjector` interface:
`project()` takes materialized per-example gradients (the references in tests);
`project_factored()` is the fast path fed by layer hooks.
"""

from __future__ import annotations

import hashlib
import math

import torch
from trak.projectors import AbstractProjector

KIND = "kronecker_rademacher_hash"
_MASK31 = (1 << 31) - 1


def _mix31(x: torch.Tensor) -> torch.Tensor:
    """A bijective integer mixer on 31-bit values (int64 tensors; products stay below 2⁶²)."""
    for mult in (0x2C1B3C6D, 0x297A2D39):
        x = x ^ (x >> 16)
        x = (x * mult) & _MASK31
    return x ^ (x >> 15)


def rademacher(rows: int, cols: int, key: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A rows × cols matrix of ±1 from a hash of (key, row, column), identical on every device."""
    r = torch.arange(rows, dtype=torch.int64, device=device).unsqueeze(1)
    c = torch.arange(cols, dtype=torch.int64, device=device).unsqueeze(0)
    h = _mix31(_mix31((r + key) & _MASK31) ^ c)
    return ((h >> 11) & 1).to(torch.float32) * 2 - 1


def layer_key(seed: int, name: str, factor: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}:{factor}".encode()).digest()[:4], "little") & _MASK31


def layer_split(out_dim: int, in_dim: int, d: int) -> tuple[int, int]:
    """(k_out, k_in) with k_out · k_in = d for one layer.

    A Kronecker sketch's variance grows like 1/k_out + 1/k_in for each side it compresses, so
    the split keeps the smaller compressed side as large as possible (a side whose k reaches its
    dimension costs nothing in accuracy), then prefers the cheaper factor products.
    """
    def key(split: tuple[int, int]) -> tuple[float, int, tuple[int, int]]:
        k_out, k_in = split
        worst = max(1 / k_out if k_out < out_dim else 0.0, 1 / k_in if k_in < in_dim else 0.0)
        return worst, out_dim * k_out + in_dim * k_in, split

    return min(((k, d // k) for k in range(1, d + 1) if d % k == 0), key=key)


class KroneckerProjector(AbstractProjector):
    """Projects per-layer gradients of linear weights to one d-dimensional sketch."""

    def __init__(self, layers: dict[str, tuple[int, int]], proj_dim: int, seed: int,
                 device: torch.device | str = "cpu"):
        grad_dim = sum(o * i for o, i in layers.values())
        super().__init__(grad_dim=grad_dim, proj_dim=proj_dim, seed=seed, proj_type=KIND, device=device)
        self.layers = dict(layers)
        self.splits = {n: layer_split(o, i, proj_dim) for n, (o, i) in layers.items()}
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_out, P_in) of one layer, entries ±1/√k, made once and kept (their size is O(in + out))."""
        if name not in self._factors:
            (out_dim, in_dim), (k_out, k_in) = self.layers[name], self.splits[name]
            p_out = rademacher(out_dim, k_out, layer_key(self.seed, name, "out"), self.device) / math.sqrt(k_out)
            p_in = rademacher(in_dim, k_in, layer_key(self.seed, name, "in"), self.device) / math.sqrt(k_in)
            self._factors[name] = (p_out, p_in)
        return self._factors[name]

    def project_factored(self, name: str, inputs: torch.Tensor, out_grads: torch.Tensor) -> torch.Tensor:
        """Sketch of Σ_t δ_t x_tᵀ per example from inputs (B, T, in) and output grads (B, T, out)."""
        p_out, p_in = self.factors(name)
        a = inputs.to(p_in.dtype) @ p_in  # (B, T, k_in)
        b = out_grads.to(p_out.dtype) @ p_out  # (B, T, k_out)
        return torch.einsum("bto,bti->boi", b, a).reshape(a.shape[0], -1)

    def project(self, grads: dict[str, torch.Tensor], model_id: int = 0) -> torch.Tensor:
        """Sketch of materialized per-example weight gradients {layer: (B, out, in)}."""
        total = None
        for name, g in grads.items():
            p_out, p_in = self.factors(name)
            part = (p_out.T @ g.to(p_out.dtype) @ p_in).reshape(g.shape[0], -1)
            total = part if total is None else total + part
        return total
