"""Seeded random projections P (p x k) applied chunk by chunk, so no p x k matrix larger than a chunk is formed.

P is defined by (kind, seed, p, k) alone: rows are generated in fixed blocks of `BLOCK_ROWS`, each from its
own generator seeded by (seed, block index). The compute chunk size therefore changes only the order
of summation, never the matrix. Entries are scaled by 1/sqrt(k) so inner products are preserved in
expectation (Johnson-Lindenstrauss).
"""
from __future__ import annotations

import math

import torch

from .io import derive_seed

BLOCK_ROWS = 1024
DENSE_KINDS = ("rademacher", "gaussian", "identity")
# From one batched backward with layer hooks (core/factorized.py), no per-example gradient and no p x k matrix:
# "factorized" = Kronecker product P_out (x) P_in, "tensorsketch" = count sketches combined by FFT.
FACTORIZED_KINDS = {"factorized": "kronecker", "tensorsketch": "tensor"}
PROJECTOR_KINDS = DENSE_KINDS + tuple(FACTORIZED_KINDS)
# Built by `core.sketch.make_projector` on the layer engine (full gradients included: exact per-layer gradients from the
# hooks' factors, no vmap for the layers it covers).
HOOKED_KINDS = (*FACTORIZED_KINDS, "identity")


class RandomProjector:
    """Dense Rademacher/Gaussian projection of (B, p) gradients to (B, k) features; `identity` keeps them.

    P is kept in memory when it fits in `cache_bytes` (p * k * 4 bytes; default 1 GiB, e.g. p = 100k at k = 2048);
    otherwise every batch regenerates it block by block, which dominates featurization for big models: use
    `projector="factorized"` there.
    """

    def __init__(self, num_params: int, proj_dim: int, kind: str = "rademacher", seed: int = 0,
                 chunk_rows: int = 8 * BLOCK_ROWS, cache_bytes: int = 2**30, device: str | torch.device = "cpu"):
        if kind not in DENSE_KINDS:
            hint = ": use core.sketch.make_projector" if kind in FACTORIZED_KINDS else ""
            raise ValueError(f"dense projector kind must be one of {DENSE_KINDS}, got {kind!r}{hint}")
        if kind == "identity":
            proj_dim = num_params
        if not isinstance(proj_dim, int) or proj_dim <= 0:
            raise ValueError(f"proj_dim must be a positive integer (e.g. 2048), got {proj_dim!r}")
        if num_params <= 0:
            raise ValueError("the model has no parameters to attribute through")
        if chunk_rows % BLOCK_ROWS:
            raise ValueError(f"chunk_rows must be a multiple of {BLOCK_ROWS}")
        self.num_params, self.proj_dim, self.kind, self.seed = num_params, proj_dim, kind, int(seed)
        self.chunk_rows = chunk_rows
        self.device = torch.device(device)
        full_bytes = num_params * proj_dim * 4
        self._cache: dict[int, torch.Tensor] | None = {} if full_bytes <= cache_bytes else None

    @property
    def settings(self) -> dict:
        return {"projector": self.kind, "proj_dim": self.proj_dim, "seed": self.seed, "num_params": self.num_params}

    def block(self, index: int) -> torch.Tensor:
        """Rows [index*BLOCK_ROWS, ...) of P, generated on the CPU from (seed, index) and moved to the device."""
        rows = min(BLOCK_ROWS, self.num_params - index * BLOCK_ROWS)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "dense-block", index))
        if self.kind == "rademacher":
            mat = torch.randint(0, 2, (rows, self.proj_dim), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
        else:
            mat = torch.randn(rows, self.proj_dim, generator=gen)
        return mat.div_(math.sqrt(self.proj_dim)).to(self.device)

    def _chunk(self, start_block: int, n_blocks: int) -> torch.Tensor:
        if self._cache is not None and start_block in self._cache:
            return self._cache[start_block]
        mat = torch.cat([self.block(b) for b in range(start_block, start_block + n_blocks)], dim=0)
        if self._cache is not None:
            self._cache[start_block] = mat
        return mat

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        """Project (B, p) -> (B, k) in float32."""
        if grads.shape[-1] != self.num_params:
            raise ValueError(f"gradients have {grads.shape[-1]} columns, the projector expects {self.num_params}")
        if self.kind == "identity":
            return grads.float()
        out = torch.zeros(grads.shape[0], self.proj_dim, device=grads.device, dtype=torch.float32)
        blocks_per_chunk = self.chunk_rows // BLOCK_ROWS
        n_blocks = math.ceil(self.num_params / BLOCK_ROWS)
        for start in range(0, n_blocks, blocks_per_chunk):
            nb = min(blocks_per_chunk, n_blocks - start)
            lo = start * BLOCK_ROWS
            mat = self._chunk(start, nb)
            out.addmm_(grads[:, lo:lo + mat.shape[0]].float(), mat)
        return out

    def matrix(self) -> torch.Tensor:
        """The explicit p x k matrix (for tests and small models only)."""
        n_blocks = math.ceil(self.num_params / BLOCK_ROWS)
        return torch.cat([self.block(b) for b in range(n_blocks)], dim=0)
