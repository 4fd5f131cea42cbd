"""``ParamLoRA``: low-rank adapters on a parameter that is not a module (MoE expert stacks).

transformers 5 stores the experts of a mixture-of-experts block as 3-D parameters of one module
(``mlp.experts.gate_up_proj`` of shape ``(experts, 2·inter, hidden)``), which no ``nn.Linear``
wrapper can reach. ``ParamLoRA`` wraps the module that holds the parameter and, for the length of
the wrapped module's forward, replaces the parameter by ``W + ΔW`` (a ``torch.nn.utils.parametrize``
parametrization, as PEFT 0.21's ``ParamWrapper`` does). One wrapper adapts one parameter; two
parameters of one module nest (``experts`` -> ``experts.base_layer`` -> the module).

The factors, their shapes and the order of their rows follow PEFT exactly, so state dicts map one
to one (``r`` is the rank *per expert*, ``E`` the number of experts):

=====================  ===================  =================  ================================
parameter              read as (in, out)    ``lora_A.weight``  ``ΔW``
=====================  ===================  =================  ================================
3-D ``(E, d1, d2)``    ``in=d2, out=d1``    ``(r·E, in)``      ``ΔW[e] = s · B_e @ A_e``  (E, out, in)
3-D, module has        ``in=d1, out=d2``    ``(r·E, in)``      ``ΔW[e] = s · (B_e @ A_e).T``
``is_transposed=True``
2-D ``(out, in)``      ``in=d2, out=d1``    ``(r, in)``        ``s · B @ A``  (a Linear's weight)
=====================  ===================  =================  ================================

``lora_B.weight`` is ``(out, r·E)``. Expert ``e``'s factors are ``A_e = A.view(E, r, in)[e]``
(rows grouped by expert) and ``B_e = B.view(out, r, E)[:, :, e]`` (columns interleaved by rank):
PEFT's layout, kept so that files load both ways. Dropout, DoRA and bias are refused (the input
of the delta cannot be separated from the module's routing), as in PEFT.

**Quantized experts (QLoRA).** :meth:`ParamLoRA.quantize_base` stores the frozen parameter in a
base format of :mod:`loraq.quant.formats`, one record per expert (each expert's matrix is
quantized on its own, so an expert's blocks never straddle two experts), and removes it from the
module. For each forward the stack is dequantized in the compute dtype and lent to the module as
a plain attribute (with ``ΔW`` added), then taken back; merging re-quantizes (lossy, the change
is returned, as :class:`~loraq.layers.lora.LoRALayer` does), and :meth:`ParamLoRA.release`
gives the module back a dense parameter. PEFT keeps expert stacks dense (bitsandbytes has no 3-D
layer), so a quantized expert base is loraq's own; its adapter files are the same.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..quant.formats import GGUF, BaseFormat, Record
from .lora import adapter_scaling

__all__ = ["ParamLoRA", "param_shape_facts"]


def param_shape_facts(shape: tuple[int, ...], transposed: bool) -> tuple[int, int, int]:
    """``(experts, in_features, out_features)`` of a targeted parameter, as PEFT reads it.

    Raises:
        ValueError: for a parameter that is neither 2-D nor 3-D.
    """
    if len(shape) == 3:
        experts, d1, d2 = shape
        return (experts, d1, d2) if transposed else (experts, d2, d1)
    if len(shape) == 2:
        return 1, shape[1], shape[0]
    raise ValueError(f"a {len(shape)}-D parameter of shape {tuple(shape)}; only 2-D and 3-D are")


class _DeltaProxy(nn.Module):
    """The parametrization ``W -> W + ΔW`` for one forward pass (factors kept low-rank for 3-D)."""

    def __init__(self, lhs: torch.Tensor | None, rhs: torch.Tensor | None, scale: float, delta):
        super().__init__()
        self.lhs, self.rhs, self.scale, self.delta = lhs, rhs, scale, delta

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.delta is not None:
            return weight + self.delta
        # One baddbmm instead of a materialised ΔW the size of the expert stack; in W's dtype,
        # whatever autocast says (a parametrization must not change the dtype), as PEFT does.
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return torch.baddbmm(weight, self.lhs, self.rhs, alpha=self.scale)


class ParamLoRA(nn.Module):
    """Wrap ``base_layer`` and add low-rank adapters to its parameter ``parameter_name``.

    ``base_layer`` is the module that holds the parameter, or another ``ParamLoRA`` around it (to
    adapt a second parameter of the same module). The wrapped module's forward runs unchanged,
    except that it sees ``W + ΔW`` for the active, unmerged adapter. Reading ``holder.<name>``
    outside the forward gives the frozen base ``W``.

    Args:
        base_layer: the holder of the parameter (or a ``ParamLoRA`` around it).
        parameter_name: the parameter's attribute name on the holder (``"gate_up_proj"``).
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        holder = self.holder
        param = holder._parameters.get(parameter_name)
        if param is None:
            raise ValueError(
                f"{type(holder).__name__} has no parameter {parameter_name!r} of its own"
            )
        try:
            facts = param_shape_facts(
                tuple(param.shape), bool(getattr(holder, "is_transposed", False))
            )
        except ValueError as err:
            raise ValueError(f"parameter {parameter_name!r} is {err} supported") from None
        self.num_experts, self.in_features, self.out_features = facts
        param.requires_grad_(False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        # The quantized base (quantize_base): one record per expert (one for a 2-D weight),
        # the stack's shape and the dtype it is dequantized to. None while the base is dense.
        self.base_records: list[Record] | None = None
        self._base_shape: torch.Size | None = None
        self._compute_dtype: torch.dtype | None = None
        self._base_format: BaseFormat | None = None
        self._base_options: tuple[int | None, bool] = (None, True)  # blocksize, double_quant
        self.follow_base_mode()

    def follow_base_mode(self, adapter: str | None = None) -> None:
        """Put this wrapper and its adapter modules in the wrapped module's train/eval mode
        (a wrapper added to a model in ``eval()`` mode stays in eval mode); ``adapter``: only
        that adapter's modules (as :meth:`LoRALayer.follow_base_mode`)."""
        self.training = self.base_layer.training
        if adapter is not None:
            for store in (self.lora_A, self.lora_B, self.lora_dropout):
                store[adapter].train(self.training)
            return
        for child in self.children():
            if child is not self.base_layer:
                child.train(self.training)

    # ------------------------------------------------------------------ the adapted parameter
    @property
    def holder(self) -> nn.Module:
        """The module that owns the parameter (inside any nested ``ParamLoRA``)."""
        module = self.base_layer
        while isinstance(module, ParamLoRA):
            module = module.base_layer
        return module

    @property
    def is_quantized(self) -> bool:
        """True when the frozen parameter is held in a quantized format (:meth:`quantize_base`)."""
        return self.base_records is not None

    @property
    def bias(self) -> None:
        """None: the adapted parameter has no bias of its own."""
        return None

    @property
    def base_shape(self) -> torch.Size:
        """The shape of the adapted parameter (dense or quantized)."""
        if self._base_shape is not None:
            return self._base_shape
        return self.base_param().shape

    @property
    def is_3d(self) -> bool:
        """True for an expert stack ``(E, ., .)``, False for a 2-D weight."""
        if self._base_shape is not None:
            return len(self._base_shape) == 3
        return self.base_param().dim() == 3

    def base_param(self) -> torch.Tensor:
        """The frozen parameter (never parametrized: read between forwards); for a quantized
        base, its dequantized stack in the compute dtype (a new tensor)."""
        if self.base_records is None:
            return self.holder._parameters[self.parameter_name]
        experts = [r.dequantize(self._compute_dtype) for r in self.base_records]
        return torch.stack(experts) if len(self._base_shape) == 3 else experts[0]

    # ------------------------------------------------------------------ a quantized base
    @torch.no_grad()
    def quantize_base(
        self,
        fmt: BaseFormat,
        *,
        blocksize: int | None = None,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
    ) -> bool:
        """Store the frozen parameter in ``fmt``, one record per expert; returns False (and
        leaves it dense) when a GGUF format's blocks do not divide the rows, True otherwise."""
        if self.base_records is not None:
            return True
        if self.merged_adapters:
            raise RuntimeError("cannot quantize a merged base; call unmerge() first")
        param = self.base_param()
        if fmt.kind == GGUF and param.shape[-1] % fmt.blocksize:
            return False
        experts = list(param) if param.dim() == 3 else [param]
        self.base_records = [fmt.quantize_tensor(e, blocksize, double_quant) for e in experts]
        self._base_shape = param.shape
        self._compute_dtype = compute_dtype
        self._base_format, self._base_options = fmt, (blocksize, double_quant)
        # A None entry keeps the parameter's place (PEFT nests wrappers in registration order)
        # while nothing dense stays behind.
        self.holder._parameters[self.parameter_name] = None
        return True

    def dequantize_base(self) -> None:
        """Give the module back a dense parameter (the dequantized stack in the compute dtype);
        merges after this are exact. Nothing to do for a dense base."""
        if self.base_records is None:
            return
        dense = self.base_param()
        self.base_records = None
        self._base_shape = None
        self.holder._parameters[self.parameter_name] = nn.Parameter(dense, requires_grad=False)

    def release(self) -> nn.Module:
        """The wrapped module with a dense parameter (for unloading); the wrapper is done."""
        self.dequantize_base()
        return self.base_layer

    @contextlib.contextmanager
    def _lent(self, names: list[str]) -> Iterator[None]:
        # A quantized base has no parameter: the module finds the dequantized stack (plus ΔW)
        # in its instance dict, which attribute lookup reads before nn.Module's registries.
        weight = self.base_param()
        if names:
            weight = self._proxy(names, weight.dtype)(weight)
        holder = self.holder
        holder.__dict__[self.parameter_name] = weight
        try:
            yield
        finally:
            holder.__dict__.pop(self.parameter_name, None)

    @property
    def _swapped(self) -> bool:
        # PEFT's word: the stack is (E, out, in), like a Linear weight per expert.
        return self.is_3d and not getattr(self.holder, "is_transposed", False)

    # ------------------------------------------------------------------ adapters
    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        *,
        init: str = "kaiming",
        use_rslora: bool = False,
    ) -> None:
        """Add adapter ``name`` with rank ``r`` per expert (inactive until made active)."""
        if name in self.r:
            raise ValueError(f"adapter {name!r} already exists on this parameter")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"rank must be a positive integer, got {r!r}")
        if self.merged_adapters:
            raise RuntimeError(
                "cannot add an adapter while adapters are merged; call unmerge() first"
            )
        param = self.base_param()
        dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        rows = r * self.num_experts
        factory = {"dtype": dtype, "device": param.device}
        self.lora_A[name] = nn.Linear(self.in_features, rows, bias=False, **factory)
        self.lora_B[name] = nn.Linear(rows, self.out_features, bias=False, **factory)
        self.lora_dropout[name] = nn.Identity()
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = adapter_scaling(alpha, r, use_rslora)
        self.use_dora[name] = False
        self.follow_base_mode(name)
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(self.lora_A[name].weight, std=1.0 / r)
            else:
                raise ValueError(f"unknown init {init!r} for a parameter adapter")
            nn.init.zeros_(self.lora_B[name].weight)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` and its parameters."""
        if name not in self.r:
            raise KeyError(f"no adapter {name!r} on this parameter; present: {list(self.r)}")
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged; call unmerge() before deleting it")
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.use_dora):
            del table[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter ``name``."""
        return [self.lora_A[name].weight, self.lora_B[name].weight]

    # ------------------------------------------------------------------ the delta
    def expert_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B_e, A_e)`` stacked over experts: ``(E, out, r)`` and ``(E, r, in)``."""
        a = self.lora_A[name].weight
        b = self.lora_B[name].weight
        a = a.reshape(self.num_experts, -1, a.shape[-1])
        b = b.reshape(b.shape[0], -1, self.num_experts).permute(2, 0, 1)
        return b, a

    def delta(self, name: str) -> torch.Tensor:
        """``ΔW`` of adapter ``name`` in the parameter's own layout and the adapters' dtype."""
        s = self.scaling[name]
        if not self.is_3d:
            return (self.lora_B[name].weight @ self.lora_A[name].weight) * s
        b, a = self.expert_factors(name)
        delta = torch.bmm(b, a) * s  # (E, out, in)
        return delta if self._swapped else delta.transpose(1, 2)

    def _proxy(self, names: list[str], dtype: torch.dtype) -> _DeltaProxy:
        if len(names) == 1 and self.is_3d:
            b, a = self.expert_factors(names[0])
            lhs, rhs = (b, a) if self._swapped else (a.transpose(1, 2), b.transpose(1, 2))
            return _DeltaProxy(lhs.to(dtype), rhs.to(dtype), self.scaling[names[0]], None)
        delta = sum(self.delta(n) for n in names)
        return _DeltaProxy(None, None, 1.0, delta.to(dtype))

    @contextlib.contextmanager
    def _adapted(self, names: list[str]) -> Iterator[None]:
        holder = self.holder
        proxy = self._proxy(names, self.base_param().dtype)
        parametrize.register_parametrization(holder, self.parameter_name, proxy, unsafe=True)
        try:
            with parametrize.cached():
                yield
        finally:
            parametrize.remove_parametrizations(
                holder, self.parameter_name, leave_parametrized=False
            )

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's output, computed with ``W + ΔW`` of the active adapter."""
        if self.adapters_disabled and self.merged_adapters:
            self.unmerge()
        active = [n for n in self.active_adapters if n in self.r and n not in self.merged_adapters]
        if self.adapters_disabled:
            active = []
        if self.base_records is not None:
            with self._lent(active):
                return self.base_layer(*args, **kwargs)
        if not active:
            return self.base_layer(*args, **kwargs)
        with self._adapted(active):
            return self.base_layer(*args, **kwargs)

    # ------------------------------------------------------------------ merge / unmerge
    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> float:
        """Fold the given (default: active) adapters into the parameter. Returns the largest
        absolute change re-quantizing the merged weight made (0.0 for a dense base)."""
        names = [
            n
            for n in (names or self.active_adapters)
            if n in self.r and n not in self.merged_adapters
        ]
        worst = 0.0
        for name in names:
            worst = max(worst, self._add_delta(name, 1.0))
            self.merged_adapters.append(name)
        return worst

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (last merged first)."""
        while self.merged_adapters:
            self._add_delta(self.merged_adapters.pop(), -1.0)

    def _add_delta(self, name: str, sign: float) -> float:
        param = self.base_param()
        work = torch.float64 if param.dtype == torch.float64 else torch.float32
        merged = param.to(work) + sign * self.delta(name).detach().to(work)
        if self.base_records is None:
            param.copy_(merged.to(param.dtype))
            return 0.0
        self._requantize(merged)
        return float((self.base_param().to(work) - merged).abs().max())

    def _requantize(self, dense: torch.Tensor) -> None:
        old = self.base_records
        experts = list(dense) if dense.dim() == 3 else [dense]
        self.base_records = [
            self._base_format.quantize_tensor(e.to(r.dtype), *self._base_options)
            for r, e in zip(old, experts, strict=True)
        ]

    def extra_repr(self) -> str:
        return (
            f"parameter_name={self.parameter_name!r}, experts={self.num_experts}, "
            f"in={self.in_features}, out={self.out_features}, "
            f"adapters={ {n: self.r[n] for n in self.r} }, active={self.active_adapters}"
        )
