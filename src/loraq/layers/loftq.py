"""LoftQ: a quantized weight plus a low-rank adapter that absorbs the quantization error.

LoftQ (Li et al., 2023, arXiv:2310.08659) starts QLoRA from ``Q + s·B·A ≈ W`` instead of
``Q(W) + 0``. It alternates two steps, each the best answer to half of the problem:

=====  ==========================================  =============================================
step   given                                       computes
=====  ==========================================  =============================================
1      the adapter ``s·B·A`` (zero at first)        ``Q = quantize(W - s·B·A)``
2      the quantized weight ``Q``                   ``B, A`` = best rank-r approximation of
                                                    ``(W - Q) / s`` (truncated SVD)
=====  ==========================================  =============================================

One iteration is plain quantization followed by a rank-r correction, so its error
``||W - (Q + s·B·A)||_F`` is never above plain quantization's. Later iterations usually lower
it further; the iterate with the smallest error is returned, so more iterations never hurt.

The functions here are pure and work on one matrix at a time: the caller quantizes a model
layer by layer, so the extra memory is a few copies of one dense layer. ``quantize`` is any
function returning ``(stored, dequantized)``; NF4, FP4, 8-bit and GGUF block formats all fit.
Unlike PEFT's ``loftq_init`` the adapter scale ``s = alpha / r`` is divided out, so the
initialised layer approximates ``W`` whatever ``alpha`` is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["LoftQResult", "loftq_decompose", "low_rank_factors", "relative_error"]

#: ``quantize(target) -> (stored record, dequantized dense tensor)``.
Quantizer = Callable[[torch.Tensor], tuple[Any, torch.Tensor]]


@dataclass
class LoftQResult:
    """What :func:`loftq_decompose` found for one weight.

    Attributes:
        stored: the quantized record of the best iterate (what the base layer keeps).
        a: ``(r, in)`` adapter factor A. b: ``(out, r)`` adapter factor B (float32).
        errors: ``||W - (Q + s·B·A)||_F / ||W||_F`` after each iteration.
        plain_error: ``||W - Q(W)||_F / ||W||_F``, the error of plain quantization.
        best_iteration: the 1-based iteration whose iterate was kept.
    """

    stored: Any
    a: torch.Tensor
    b: torch.Tensor
    errors: list[float] = field(default_factory=list)
    plain_error: float = 0.0
    best_iteration: int = 1

    @property
    def error(self) -> float:
        """The relative error of the kept iterate."""
        return self.errors[self.best_iteration - 1]


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||weight - approx||_F / ||weight||_F`` in float64 (0 for an all-zero weight)."""
    w = weight.double()
    norm = float(torch.linalg.matrix_norm(w))
    diff = float(torch.linalg.matrix_norm(w - approx.double()))
    return diff / norm if norm > 0 else diff


def low_rank_factors(
    residual: torch.Tensor, rank: int, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``scaling·B@A`` the best rank-``rank`` approximation of ``residual``.

    The top singular triplets come from the eigen-decomposition of the smaller Gram matrix in
    float64: the same subspace as a truncated SVD, at a fraction of its cost on CPU. The singular
    values are split evenly (``B = U·√S``, ``A = √S·Vᵀ``, each divided by ``√scaling``), so A
    and B have the same scale, as PiSSA and PEFT's LoftQ do. Returned in ``residual``'s dtype.
    """
    if residual.dim() != 2:
        raise ValueError(f"low_rank_factors needs a 2-D matrix, got shape {tuple(residual.shape)}")
    if not 0 < rank <= min(residual.shape):
        raise ValueError(
            f"rank {rank} is invalid for a {tuple(residual.shape)} matrix: "
            f"expected 1..{min(residual.shape)}"
        )
    m = residual.double()
    wide = m.shape[0] < m.shape[1]  # eigen-decompose the smaller of M·Mᵀ and Mᵀ·M
    gram = m @ m.T if wide else m.T @ m
    values, vectors = torch.linalg.eigh(gram)  # ascending
    top = vectors[:, -rank:].flip(-1)
    sigma = values[-rank:].flip(-1).clamp_min(0).sqrt()
    other = (m.T @ top if wide else m @ top) / sigma.clamp_min(torch.finfo(m.dtype).tiny)
    u, vh = (top, other.T) if wide else (other, top.T)
    root = (sigma / scaling).sqrt()
    a = root[:, None] * vh
    b = u * root[None, :]
    return a.to(residual.dtype), b.to(residual.dtype)


@torch.no_grad()
def loftq_decompose(
    weight: torch.Tensor,
    rank: int,
    quantize: Quantizer,
    *,
    scaling: float = 1.0,
    iters: int = 1,
) -> LoftQResult:
    """Alternate quantization and truncated SVD so that ``Q + scaling·B@A ≈ weight``.

    Args:
        weight: the dense ``(out, in)`` weight (any float dtype; the work is float32, or float64
            for a float64 weight).
        rank: adapter rank, ``1..min(out, in)``.
        quantize: ``target -> (stored, dequantized)`` for the base's format.
        scaling: the adapter scale ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        iters: number of alternations (>= 1).

    Returns:
        a :class:`LoftQResult` holding the best iterate and the error after every iteration.
    """
    if iters < 1:
        raise ValueError(f"loftq iters must be >= 1, got {iters}")
    if scaling <= 0:
        raise ValueError(f"loftq scaling must be positive, got {scaling}")
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(work)
    norm = float(torch.linalg.matrix_norm(w.double())) or 1.0
    target = w
    best: LoftQResult | None = None
    errors: list[float] = []
    plain = 0.0
    for i in range(1, iters + 1):
        stored, q = quantize(target)
        residual = w - q.to(work)
        if i == 1:
            plain = float(torch.linalg.matrix_norm(residual.double())) / norm
        a, b = low_rank_factors(residual, rank, scaling)
        adapter = (b @ a) * scaling
        errors.append(float(torch.linalg.matrix_norm((residual - adapter).double())) / norm)
        if best is None or errors[-1] < best.error:
            best = LoftQResult(stored, a, b, errors, best_iteration=i)
        del q, residual
        target = w - adapter
    assert best is not None
    best.plain_error = plain
    return best
