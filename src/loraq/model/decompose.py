"""Low-rank compression: replace Linear layers by two thin Linears from a truncated SVD."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import _check_names
from .targeting import candidate_modules, name_matches, set_submodule


@dataclass
class LayerDecomposition:
    """What :func:`decompose` did to one layer."""

    name: str
    rank: int
    params_before: int
    params_after: int
    relative_error: float  # ||W - W_k||_F / ||W||_F, the Eckart–Young optimum for this rank


@dataclass
class DecompositionReport:
    """Per-layer ranks and errors plus the total parameter saving of :func:`decompose`."""

    layers: list[LayerDecomposition] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        """Parameters of the replaced layers before decomposition."""
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        """Parameters of their replacements."""
        return sum(layer.params_after for layer in self.layers)

    @property
    def saving(self) -> float:
        """Fraction of the replaced layers' parameters saved (negative if the rank is too high)."""
        return 1.0 - self.params_after / max(self.params_before, 1)

    def __str__(self) -> str:
        rows = [f"{'layer':<48} {'rank':>5} {'before':>10} {'after':>10} {'rel.err':>8}"]
        for layer in self.layers:
            rows.append(
                f"{layer.name:<48} {layer.rank:>5} {layer.params_before:>10,} "
                f"{layer.params_after:>10,} {layer.relative_error:>8.4f}"
            )
        rows.append(f"saving: {100 * self.saving:.1f}% of {self.params_before:,} parameters")
        return "\n".join(rows)


def choose_rank(singular_values: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """A fixed ``rank`` (capped at the matrix rank), or the smallest rank whose squared singular
    values keep at least the fraction ``energy`` of the total."""
    full = singular_values.numel()
    if rank is not None:
        return min(rank, full)
    assert energy is not None
    power = singular_values.double().square()
    kept = torch.cumsum(power, 0) / power.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return min(
        int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1,
        full,
    )


@torch.no_grad()
def decompose(
    model: nn.Module,
    rank: int | None = None,
    energy: float | None = None,
    targets: str | list[str] = "all-linear",
) -> DecompositionReport:
    """Replace each targeted ``nn.Linear`` by ``Sequential(Linear(in, k), Linear(k, out))``.

    The two factors come from the truncated SVD ``W ≈ U_k S_k V_k^T`` (``first = S_k V_k^T``,
    ``second = U_k``), which is the best rank-k approximation in Frobenius norm (Eckart–Young).
    Give either ``rank`` or ``energy`` (fraction of ``sum(s_i^2)`` to keep, in (0, 1]).
    ``targets`` uses the same rules as ``LoraConfig.targets``.
    """
    if (rank is None) == (energy is None):
        raise ValueError("decompose() needs exactly one of rank=... or energy=...")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"decompose(rank={rank!r}) is invalid: expected a positive integer")
    if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < energy <= 1.0):
        raise ValueError(f"decompose(energy={energy!r}) is invalid: expected a fraction in (0, 1]")
    targets = _check_names("targets", targets, allow_all_linear=True)
    chosen = [
        (name, module)
        for name, module in candidate_modules(model)
        if name
        and type(module) is nn.Linear
        and (targets == "all-linear" or name_matches(name, targets))
    ]
    if not chosen:
        raise ValueError(f"decompose(targets={targets!r}) matched no nn.Linear in the model")
    report = DecompositionReport()
    for name, linear in chosen:
        weight = linear.weight
        work = weight.to(torch.float64)
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        k = choose_rank(s, rank, energy)
        first = nn.Linear(
            linear.in_features, k, bias=False, device=weight.device, dtype=weight.dtype
        )
        second = nn.Linear(
            k,
            linear.out_features,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        first.weight.copy_((s[:k, None] * vh[:k]).to(weight.dtype))
        second.weight.copy_(u[:, :k].to(weight.dtype))
        if linear.bias is not None:
            second.bias.copy_(linear.bias)
        first.weight.requires_grad_(weight.requires_grad)
        second.weight.requires_grad_(weight.requires_grad)
        set_submodule(model, name, nn.Sequential(first, second))
        tail = s[k:].square().sum().sqrt()
        rel = float(tail / s.square().sum().sqrt().clamp_min(1e-300))
        before = weight.numel() + (0 if linear.bias is None else linear.bias.numel())
        after = (
            first.weight.numel()
            + second.weight.numel()
            + (0 if linear.bias is None else linear.bias.numel())
        )
        report.layers.append(LayerDecomposition(name, k, before, after, rel))
    return report
