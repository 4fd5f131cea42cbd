"""``combine``: a new adapter made of weighted existing ones (PEFT's ``add_weighted_adapter``).

``loraq.combine(model, {"a": 0.7, "b": 0.3}, method="ties", density=0.5, name="ab")`` adds
adapter ``ab`` to ``model``: a normal adapter that :func:`loraq.save_adapter` writes in PEFT's
layout, that exports and serves like any other. Its tensors equal those PEFT's
``add_weighted_adapter`` makes from the same adapters (and, for DARE, the same torch seed: the
new adapter is first initialised as PEFT initialises it, then the masks are drawn layer by
layer, A's before B's, adapter by adapter). The rules themselves live in :mod:`.merge_rules`.

===================  ============  ===========================================================
method               new rank      what is combined (``s_i``: adapter i's scaling)
===================  ============  ===========================================================
``cat``              ``sum r_i``   exact: ``A = [w_i s_i A_i]`` stacked, ``B = [B_i]`` side by
                                   side, so ``B A = sum_i w_i s_i B_i A_i``
``linear``           ``r``         A's and B's separately, each weighted by ``sqrt(|w_i s_i|)``
``ties``             (equal ``r``  (the sign of ``w_i s_i`` goes on A), by the rule of the
``dare_linear``       needed)      same name; an approximation of the weighted sum of deltas
``dare_ties``
``magnitude_prune``
``svd``              ``svd_rank``  the deltas ``w_i s_i B_i A_i`` summed (``svd``) or merged by
``ties_svd`` ...     or max r_i    TIES / DARE / pruning (``<rule>_svd``), then the truncated
                                   SVD ``U S Vh``: ``B = U S``, ``A = Vh``
===================  ============  ===========================================================

The new adapter has ``alpha = r`` (scaling 1: the sources' scalings are inside its factors),
starts inactive and untrained (as PEFT's), and keeps the first source's other settings.
One adapter alone is always combined ``linear`` (as PEFT). Unlike PEFT, rsLoRA sources give a
plain-scaled result (PEFT keeps ``use_rslora``, which scales the combined delta by
``sqrt(r)``), and what cannot be combined faithfully is refused: DoRA adapters, adapters with
``modules_to_save``, adapters over different modules or bases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..layers.lora import LoRALayer
from .config import LoraConfig
from .merge_rules import (
    MAJORITY_SIGN_METHODS,
    MergeRule,
    dare_linear,
    dare_ties,
    magnitude_prune,
    task_arithmetic,
    ties,
)
from .surgery import (
    CONFIGS_ATTR,
    TARGETS_ATTR,
    active_adapter,
    adapter_names,
    apply,
    lora_layers,
    set_adapter,
)
from .transaction import model_transaction

#: Methods that combine the A's and the B's separately (all sources need the same rank).
FACTOR_METHODS: dict[str, MergeRule] = {
    "linear": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "magnitude_prune": magnitude_prune,
}
#: Methods that combine the full deltas, then factor the result by truncated SVD.
SVD_METHODS: dict[str, MergeRule] = {
    "svd": task_arithmetic,
    "ties_svd": ties,
    "dare_linear_svd": dare_linear,
    "dare_ties_svd": dare_ties,
    "magnitude_prune_svd": magnitude_prune,
}
#: Every value accepted for ``method``.
COMBINE_METHODS = ("cat", *FACTOR_METHODS, *SVD_METHODS)
#: Methods that prune, and so need ``density``.
DENSITY_METHODS = tuple(
    m for m in COMBINE_METHODS if m.split("_")[0] in ("ties", "dare", "magnitude")
)
#: The adapter name ``combine`` gives when none is asked for.
DEFAULT_NAME = "combined"


@dataclass(frozen=True)
class _Plan:
    """What :func:`combine` checked, ready to run."""

    sources: list[str]
    weights: list[float]
    method: str
    rank: int
    config: LoraConfig
    density: float | None
    majority_sign: str
    svd_clamp: float | None
    svd_full_matrices: bool
    svd_driver: str | None


def combine(
    model: nn.Module,
    weights: Mapping[str, float],
    method: str = "linear",
    *,
    name: str = DEFAULT_NAME,
    density: float | None = None,
    majority_sign: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
) -> nn.Module:
    """Add adapter ``name`` to ``model``: the adapters named in ``weights`` combined by ``method``.

    Args:
        model: a model with the adapters to combine (:func:`loraq.apply` / :func:`loraq.load_adapter`).
        weights: ``{adapter name: weight}`` in the order to combine (weights may be negative).
        method: one of :data:`COMBINE_METHODS` (see the module table).
        name: the new adapter's name (it must not exist yet).
        density: the fraction of entries kept, in (0, 1]; needed by (only) the pruning methods
            :data:`DENSITY_METHODS`.
        majority_sign: TIES's sign election, ``"total"`` (sign of the sum) or ``"frequency"``.
        svd_rank: the rank of an SVD method's result (default: the largest source rank).
        svd_clamp: clamp an SVD result's factors to this quantile of their entries (None: no).
        svd_full_matrices, svd_driver: passed to ``torch.linalg.svd`` (PEFT's defaults; the
            driver applies on CUDA only). ``svd_full_matrices=False`` gives the same factors
            without the full ``(in, in)`` ``Vh``: far less memory for wide layers (embeddings).

    The new adapter is inactive (switch with :func:`loraq.set_adapter`). Bad input raises a
    ``ValueError`` naming it, before the model changes; a failure half-way leaves the model as
    it was. Returns ``model``.
    """
    plan = _plan(
        model,
        weights,
        method,
        name,
        density,
        majority_sign,
        svd_rank,
        svd_clamp,
        svd_full_matrices,
        svd_driver,
    )
    previous = active_adapter(model)
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    with model_transaction(model):
        # Added like any adapter (drawing PEFT's initial values, so DARE's masks follow the
        # same random stream), then overwritten with the combination.
        apply(model, plan.config, name, allow_large_rank=True)
        if getattr(model, TARGETS_ATTR)[name] != getattr(model, TARGETS_ATTR)[plan.sources[0]]:
            raise ValueError(
                f"combine: the config of adapter {plan.sources[0]!r} no longer selects the "
                "modules it adapts; the combined adapter would differ"
            )
        with torch.no_grad():
            for _, layer in lora_layers(model):
                if name in layer.r:
                    _write_combination(layer, name, plan)
        if previous is not None:
            set_adapter(model, previous)
        for param, flag in trainable:  # what trained before still does, and nothing else
            param.requires_grad_(flag)
    return model


# ---------------------------------------------------------------------------------- checks
def _plan(
    model: nn.Module,
    weights: Mapping[str, float],
    method: str,
    name: str,
    density: float | None,
    majority_sign: str,
    svd_rank: int | None,
    svd_clamp: float | None,
    svd_full_matrices: bool,
    svd_driver: str | None,
) -> _Plan:
    """Check everything :func:`combine` is given against ``model``; no change to the model."""
    present = adapter_names(model)
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(
            f"combine: weights must be a non-empty {{adapter name: weight}} mapping, got {weights!r}"
        )
    for source, weight in weights.items():
        if source not in present:
            raise ValueError(f"combine: unknown adapter {source!r}; adapters: {present}")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
        ):
            raise ValueError(
                f"combine: the weight of adapter {source!r} must be a finite number, got {weight!r}"
            )
    if method not in COMBINE_METHODS:
        raise ValueError(f"combine: unknown method {method!r}; expected one of {COMBINE_METHODS}")
    if method in DENSITY_METHODS:
        if (
            density is None
            or isinstance(density, bool)
            or not isinstance(density, (int, float))
            or not 0 < density <= 1
        ):
            raise ValueError(
                f"combine: method {method!r} needs density in (0, 1] (the fraction kept), "
                f"got {density!r}"
            )
    elif density is not None:
        raise ValueError(
            f"combine: density applies only to the methods {DENSITY_METHODS}, not {method!r}"
        )
    if majority_sign not in MAJORITY_SIGN_METHODS:
        raise ValueError(
            f"combine: majority_sign must be one of {MAJORITY_SIGN_METHODS}, got {majority_sign!r}"
        )
    if svd_rank is not None and (
        isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0
    ):
        raise ValueError(f"combine: svd_rank must be a positive integer, got {svd_rank!r}")
    if svd_clamp is not None and not (isinstance(svd_clamp, (int, float)) and 0 <= svd_clamp <= 1):
        raise ValueError(f"combine: svd_clamp must be a quantile in [0, 1], got {svd_clamp!r}")
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"combine: name must be a non-empty string without dots, got {name!r}")
    if name in present:
        raise ValueError(f"combine: the model already has an adapter named {name!r}")
    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        raise ValueError("combine: adapters are merged into the base; call loraq.unmerge first")

    sources = list(weights)
    configs: dict[str, LoraConfig] = getattr(model, CONFIGS_ATTR)
    _check_sources(model, sources, configs)
    if len(sources) == 1:
        method = "linear"  # as PEFT: one adapter is only ever scaled
    ranks = {s: configs[s].r for s in sources}
    if method in FACTOR_METHODS and len(set(ranks.values())) > 1:
        raise ValueError(
            f"combine: method {method!r} needs adapters of equal rank, got ranks {ranks}; "
            "use 'cat' or 'svd' for different ranks"
        )
    if method == "cat":
        rank = sum(ranks.values())
    elif method in SVD_METHODS:
        rank = svd_rank or max(ranks.values())
    else:
        rank = ranks[sources[0]]
    first = configs[sources[0]]
    config = first.replace(
        r=rank,
        alpha=rank,
        init="kaiming",
        use_rslora=False,
        adapter_bits=None,
        extra=dict(first.extra),
    )
    return _Plan(
        sources=sources,
        weights=[float(weights[s]) for s in sources],
        method=method,
        rank=rank,
        config=config,
        density=density,
        majority_sign=majority_sign,
        svd_clamp=svd_clamp,
        svd_full_matrices=svd_full_matrices,
        svd_driver=svd_driver,
    )


def _check_sources(model: nn.Module, sources: list[str], configs: dict[str, LoraConfig]) -> None:
    """The sources must adapt the same modules of the same base, without DoRA, saved modules
    or adapters on parameters (``ParamLoRA``)."""
    targets: dict[str, list[str]] = getattr(model, TARGETS_ATTR)
    first = sources[0]
    base_key = "base_model_name_or_path"
    for source in sources:
        config = configs[source]
        if config.use_dora:
            raise ValueError(
                f"combine: adapter {source!r} uses DoRA; DoRA adapters cannot be combined "
                "(their magnitudes do not add)"
            )
        if config.target_parameters:
            raise ValueError(
                f"combine: adapter {source!r} adapts parameters (target_parameters "
                f"{config.target_parameters}), which combine does not support"
            )
        if config.modules_to_save:
            raise ValueError(
                f"combine: adapter {source!r} has modules_to_save {config.modules_to_save}; "
                "adapters with fully trained module copies cannot be combined"
            )
        if set(targets[source]) != set(targets[first]):
            only_first = sorted(set(targets[first]) - set(targets[source]))
            only_this = sorted(set(targets[source]) - set(targets[first]))
            raise ValueError(
                f"combine: adapters {first!r} and {source!r} adapt different modules "
                f"(only {first!r}: {only_first[:3]}, only {source!r}: {only_this[:3]})"
            )
        base, first_base = config.extra.get(base_key), configs[first].extra.get(base_key)
        if base and first_base and base != first_base:
            raise ValueError(
                f"combine: adapters {first!r} and {source!r} were trained on different bases "
                f"({first_base!r} and {base!r})"
            )


# ---------------------------------------------------------------------------------- math
def _write_combination(layer: LoRALayer, name: str, plan: _Plan) -> None:
    """Compute one layer's combined factors and copy them into adapter ``name``."""
    if plan.method == "cat":
        a, b = _cat(layer, plan)
    elif plan.method in SVD_METHODS:
        a, b = _svd(layer, plan, name)
    else:
        a, b = _factor_rule(layer, plan)
    a_param, b_param = layer.adapter_parameters(name)
    a_param.copy_(a.reshape(a_param.shape).to(a_param.dtype))
    b_param.copy_(b.reshape(b_param.shape).to(b_param.dtype))


def _cat(layer: LoRALayer, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [layer.adapter_weights(s) for s in plan.sources]
    a = torch.cat(
        [a * w * layer.scaling[s] for (a, _), s, w in zip(pairs, plan.sources, plan.weights)],
        dim=0,
    )
    return a, torch.cat([b for _, b in pairs], dim=1)


def _factor_rule(layer: LoRALayer, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    rule = FACTOR_METHODS[plan.method]
    weights_a, weights_b = [], []
    for source, weight in zip(plan.sources, plan.weights):
        # sqrt(|w s|) on both factors, the sign on A only: B A then carries w s once.
        scaled = weight * layer.scaling[source]
        root = math.sqrt(abs(scaled))
        weights_a.append(root * (1 if scaled >= 0 else -1))
        weights_b.append(root)
    pairs = [layer.adapter_weights(s) for s in plan.sources]
    a_list = [a.detach() for a, _ in pairs]
    b_list = [b.detach() for _, b in pairs]
    device, dtype = a_list[0].device, a_list[0].dtype
    a = rule(a_list, torch.tensor(weights_a).to(device), plan.density, plan.majority_sign)
    b = rule(b_list, torch.tensor(weights_b).to(device), plan.density, plan.majority_sign)
    return a.to(dtype), b.to(dtype)


def _svd(layer: LoRALayer, plan: _Plan, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [layer.delta_matrix(s).detach() for s in plan.sources]
    if plan.rank > min(deltas[0].shape):
        raise ValueError(
            f"combine: rank {plan.rank} of adapter {name!r} exceeds min(out, in) = "
            f"{min(deltas[0].shape)} of a {layer.kind} layer; pass a smaller svd_rank"
        )
    weights = torch.tensor(plan.weights).to(deltas[0].device)
    delta = SVD_METHODS[plan.method](deltas, weights, plan.density, plan.majority_sign)
    u, s, vh = torch.linalg.svd(delta, full_matrices=plan.svd_full_matrices, driver=plan.svd_driver)
    u = u[:, : plan.rank] @ torch.diag(s[: plan.rank])
    vh = vh[: plan.rank, :]
    if plan.svd_clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), plan.svd_clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh, u
