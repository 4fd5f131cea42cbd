"""``LoRALayer``: low-rank adapters wrapped around a frozen module.

One wrapper class serves every supported layer kind. The kinds differ only in how the base weight
is seen as a matrix in the adapter's orientation (``M``, shape ``(rows of B, cols of A)`` so that
the adapter's delta is ``scaling * B @ A``) and in how the adapter branch runs on an input; one
kind object per layer (:mod:`loraq.layers.kinds`, chosen in ``__init__``) answers both:

==============  ========================  ===========================  =========================
kind            base module               ``M`` (delta orientation)     adapter branch
==============  ========================  ===========================  =========================
linear          ``nn.Linear``, quantized  ``W``              (out, in)  ``B(A(x))``
conv1d_gpt2     transformers ``Conv1D``   ``W.T``            (out, in)  ``B(A(x))``
conv            ``nn.Conv1d/2d/3d``       ``W.flatten(1)``   (out, in·k) ``B_1x1(A_conv(x))``
embedding       ``nn.Embedding``          ``W.T``            (dim, vocab) ``emb(x, A.T) @ B.T``
==============  ========================  ===========================  =========================

Merging, unmerging, DoRA's norms and PiSSA's SVD are written once against ``M``.
Parameter names follow PEFT (``lora_A.<adapter>.weight``, ``lora_embedding_A.<adapter>``,
``lora_magnitude_vector.<adapter>``) so that state dicts map one to one.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import nn

from ..core.naming import ADAPTER_STORES
from ..native.bernoulli import dropout
from .adapter_quant import grid_levels, round_to_grid
from .adapter_view import AdapterView, RowHook
from .fused import lora_linear
from .kinds import SUPPORTED_TYPES, LayerKind, is_gpt2_conv1d, layer_kind
from .merged_guard import guard_merged
from .modules_to_save import ModulesToSave
from .protocol import QuantizedBase

__all__ = [
    "ADAPTER_STORES",
    "SUPPORTED_TYPES",
    "RANDOM_INITS",
    "LoRALayer",
    "ModulesToSave",
    "is_gpt2_conv1d",
    "layer_kind",
]


#: Inits that only draw random A and B (nothing else changes): skipped for an adapter whose
#: tensors are loaded right after (``add_adapter(loaded_next=True)``). PiSSA also edits the base.
RANDOM_INITS = frozenset({"kaiming", "gaussian"})

#: Source of :attr:`LoRALayer.adapter_version` values (see ``_note_change``).
_ADAPTER_VERSIONS = itertools.count(1)


def adapter_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor applied to ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / (math.sqrt(r) if use_rslora else r)


class LoRALayer(nn.Module):
    """Wrap ``original_layer`` (frozen, untouched) and add low-rank adapters to its output.

    ``LoRALayer(layer, rank=8, alpha=16)`` is a standalone adapter: ``y = layer(x) + (alpha/rank) *
    B(A(dropout(x)))`` with B zero-initialised, so the wrapped layer starts exactly equal to the
    original. ``alpha`` defaults to ``rank`` (scale 1). ``loraq.apply`` builds these for a whole
    model; more adapters can be added with :meth:`add_adapter`.

    Args:
        original_layer: an ``nn.Linear``, ``nn.Embedding``, ``nn.Conv1d/2d/3d``, transformers
            ``Conv1D`` or a loraq quantized linear layer.
        rank: adapter rank; ``None`` creates the wrapper with no adapter yet.
        alpha: scale numerator (default: ``rank``).
        dropout: dropout probability on the adapter input.
        adapter_name: name of the first adapter.
        **options: ``init``, ``use_rslora``, ``use_dora`` as in :class:`loraq.LoraConfig`.

    Code that runs the adapters another way (mixed-adapter batches) reads them through
    :meth:`adapter_view`, watches :attr:`adapter_version` and takes over the forward pass with
    :meth:`set_row_hook` (see :mod:`loraq.layers.adapter_view`).
    """

    #: Set by :meth:`set_row_hook` (e.g. inside :func:`loraq.adapter_rows`), None otherwise:
    #: while set, :meth:`forward` returns ``row_hook(self, x, ...)`` (a :class:`RowHook`).
    row_hook: RowHook | None = None
    # class defaults, so layers pickled before these attributes existed still load
    _adapter_version: int = 0

    def __init__(
        self,
        original_layer: nn.Module,
        rank: int | None = None,
        alpha: float | None = None,
        dropout: float = 0.0,
        *,
        adapter_name: str = "default",
        **options: Any,
    ) -> None:
        super().__init__()
        kind = layer_kind(original_layer)
        if kind is None:
            raise TypeError(
                f"LoRALayer cannot wrap {type(original_layer).__name__}; supported: {SUPPORTED_TYPES}"
            )
        kind.check(original_layer)
        self._kind: LayerKind = kind
        self.base_layer = original_layer
        for param in original_layer.parameters():
            param.requires_grad_(False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        # adapters whose weights live on a k-bit grid in the forward pass (adapter_quant.py)
        self.adapter_bits: dict[str, int] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        # DoRA norms used at merge time, needed again to unmerge exactly.
        self._dora_merge_norms: dict[str, torch.Tensor] = {}
        if rank is not None:
            self.add_adapter(
                adapter_name, rank, rank if alpha is None else alpha, dropout, **options
            )
            self.active_adapters = [adapter_name]
        self.follow_base_mode()

    def follow_base_mode(self, adapter: str | None = None) -> None:
        """Put this layer and its adapter modules in the base layer's train/eval mode.

        A layer added to a model in ``eval()`` mode must not draw adapter dropout at inference;
        ``model.train()`` / ``model.eval()`` later set every module alike, as usual.
        ``adapter``: only that adapter's modules (one just added: a layer holding many adapters,
        a server's resident set, must not walk them all for each one it adds).
        """
        self.training = self.base_layer.training
        if adapter is not None:
            for store in (self.lora_A, self.lora_B, self.lora_dropout):
                if adapter in store:
                    store[adapter].train(self.training)
            return
        for child in self.children():
            if child is not self.base_layer:
                child.train(self.training)

    # ------------------------------------------------------------------ shape facts of the base
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (for code that reads ``module.weight``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return getattr(self.base_layer, "bias", None)

    @property
    def kind(self) -> str:
        """The layer kind's name: ``linear``, ``conv1d_gpt2``, ``conv`` or ``embedding``."""
        return self._kind.name

    def replace_base(self, module: nn.Module) -> None:
        """Swap the wrapped module (e.g. a quantized base for its dense form) and re-pick the kind.

        The new module must compute the same map; adapters are kept as they are.
        """
        kind = layer_kind(module)
        if kind is None:
            raise TypeError(
                f"LoRALayer cannot wrap {type(module).__name__}; supported: {SUPPORTED_TYPES}"
            )
        if kind.in_out(module) != self._in_out():
            raise ValueError(
                f"replace_base: the new {type(module).__name__} has (in, out) {kind.in_out(module)}, "
                f"the wrapped layer {self._in_out()}"
            )
        module.requires_grad_(False)
        self.base_layer = module
        self._kind = kind
        self._note_change()

    @property
    def is_quantized(self) -> bool:
        """True when the base is a quantized layer (see :class:`loraq.layers.QuantizedBase`)."""
        return isinstance(self.base_layer, QuantizedBase)

    def _in_out(self) -> tuple[int, int]:
        return self._kind.in_out(self.base_layer)

    @property
    def in_features(self) -> int:
        """Input features (channels for conv, vocabulary size for embeddings)."""
        return self._in_out()[0]

    @property
    def out_features(self) -> int:
        """Output features (channels for conv, embedding dim for embeddings)."""
        return self._in_out()[1]

    def _base_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        return self._kind.dtype_device(self.base_layer)

    def _adapter_dtype(self) -> torch.dtype:
        # Adapters train in float32 over half-precision bases (as PEFT's autocast_adapter_dtype);
        # a float64 base keeps float64 adapters so gradients can be checked in double precision.
        dtype, _ = self._base_dtype_device()
        return torch.float64 if dtype == torch.float64 else torch.float32

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype this layer's adapters compute in (float32; float64 over a float64 base)."""
        return self._adapter_dtype()

    @property
    def base_device(self) -> torch.device:
        """The device of the base weight (where adapter tensors for this layer belong)."""
        return self._base_dtype_device()[1]

    # ------------------------------------------------------------------ the public adapter view
    @property
    def adapter_version(self) -> int:
        """Grows at every change a stacked copy of the adapters depends on (module doc of
        :mod:`loraq.layers.adapter_view`); in-place tensor edits move the tensors' own versions."""
        return self._adapter_version

    def _note_change(self) -> None:
        # Drawn from one process-wide counter, so a version is never handed out twice: a
        # transaction that rolls a layer back restores its old version, and a stack cached
        # inside the failed call (under a newer version) can never match a later state.
        self._adapter_version = next(_ADAPTER_VERSIONS)

    def adapter_view(self, name: str) -> AdapterView:
        """Adapter ``name`` as an :class:`~loraq.layers.adapter_view.AdapterView` (KeyError if absent)."""
        if name not in self.r:
            raise KeyError(f"no adapter {name!r} on this layer; present: {list(self.r)}")
        a, b = self._a_b_params(name)
        base_dtype, base_device = self._base_dtype_device()
        in_f, out_f = self._in_out()
        use_dora = self.use_dora[name]
        return AdapterView(
            name=name,
            rank=self.r[name],
            scale=self.scaling[name],
            dropout_p=self._dropout_p(name),
            use_dora=use_dora,
            bits=self.adapter_bits.get(name),
            dtype=self._adapter_dtype(),
            in_features=in_f,
            out_features=out_f,
            base_dtype=base_dtype,
            base_device=base_device,
            a=a,
            b=b,
            magnitude=self.lora_magnitude_vector[name] if use_dora else None,
        )

    def set_row_hook(self, hook: RowHook | None) -> None:
        """Install ``hook`` as :attr:`row_hook` (None removes it)."""
        # a plain attribute, set without nn.Module.__setattr__'s registry checks: a decode loop
        # installs and removes the hook on every layer at every step
        self.__dict__["row_hook"] = hook

    def set_adapter_bits(self, name: str, bits: int | None) -> None:
        """Run adapter ``name`` on its ``bits``-bit grid (2..8), or in full precision (None)."""
        if bits is not None:
            grid_levels(bits)
        if name not in self.r:
            raise ValueError(f"layer has no adapter {name!r}")
        if bits is None:
            self.adapter_bits.pop(name, None)
        else:
            self.adapter_bits[name] = bits
        self._note_change()

    # ------------------------------------------------------------------ base weight as matrix M
    def base_matrix(self) -> torch.Tensor:
        """The (possibly dequantized) base weight in the adapter's orientation, detached."""
        return self._kind.matrix(self.base_layer)

    def _write_base_matrix(self, matrix: torch.Tensor) -> None:
        self._kind.write_matrix(self.base_layer, matrix)
        self._note_change()  # DoRA's stacked norms depend on the base

    def _a_b_params(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        # Read through the registries directly (no nn.Module.__getattr__): re-stacking every
        # layer's adapters for a mixed batch calls this once per layer and adapter.
        modules = self._modules
        embedding_a = modules["lora_embedding_A"]._parameters
        if name in embedding_a:
            return embedding_a[name], modules["lora_embedding_B"]._parameters[name]
        a_module = modules["lora_A"]._modules[name]
        return a_module._parameters["weight"], modules["lora_B"]._modules[name]._parameters[
            "weight"
        ]

    def adapter_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B as the forward pass uses them (on their k-bit grid if ``adapter_bits`` is set)."""
        a, b = self._a_b_params(name)
        bits = self.adapter_bits.get(name)
        if bits is None:
            return a, b
        return round_to_grid(a, bits), round_to_grid(b, bits)

    def _a_b_matrices(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.adapter_weights(name)
        return a.flatten(1), b.flatten(1)

    def delta_matrix(self, name: str) -> torch.Tensor:
        """``scaling * B @ A`` for adapter ``name``, in the orientation of :meth:`base_matrix`."""
        a, b = self._a_b_matrices(name)
        return (b @ a) * self.scaling[name]

    # ------------------------------------------------------------------ adapters
    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        init: str = "kaiming",
        use_rslora: bool = False,
        use_dora: bool = False,
        loaded_next: bool = False,
    ) -> None:
        """Add adapter ``name`` (inactive until listed in ``active_adapters``).

        ``loaded_next``: every tensor of the adapter is loaded right after (a saved adapter
        installed), so an ``init`` that only draws random factors (:data:`RANDOM_INITS`) is
        skipped and the factors start at zero.
        """
        if name in self.r:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"rank must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if use_dora and not self._kind.supports_dora:
            raise ValueError(
                "use_dora is not supported for nn.Embedding layers; target Linear/Conv layers only"
            )
        if self.merged_adapters:
            raise RuntimeError(
                "cannot add an adapter while adapters are merged; call unmerge() first"
            )
        self._note_change()
        dtype = self._adapter_dtype()
        _, device = self._base_dtype_device()
        skip_init = loaded_next and init in RANDOM_INITS
        make = self._kind.new_zero_adapter if skip_init else self._kind.new_adapter
        lora_a, lora_b = make(self.base_layer, r, dtype=dtype, device=device)
        if isinstance(lora_a, nn.Parameter):
            self.lora_embedding_A[name], self.lora_embedding_B[name] = lora_a, lora_b
        else:
            self.lora_A[name], self.lora_B[name] = lora_a, lora_b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = adapter_scaling(alpha, r, use_rslora)
        self.use_dora[name] = use_dora
        self.follow_base_mode(name)
        if not skip_init:
            self._init_adapter(name, init)
        if use_dora:
            norm = (self.base_matrix().to(dtype) + self.delta_matrix(name).detach()).norm(dim=1)
            self.lora_magnitude_vector[name] = nn.Parameter(norm.clone())

    def _init_adapter(self, name: str, init: str) -> None:
        with torch.no_grad():
            if name in self.lora_embedding_A and init != "pissa":
                # PEFT's embedding init is the transpose of the linear one: A = 0, B ~ N(0, 1).
                nn.init.zeros_(self.lora_embedding_A[name])
                nn.init.normal_(self.lora_embedding_B[name])
                return
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B[name].weight)
            elif init == "gaussian":
                nn.init.normal_(self.lora_A[name].weight, std=1.0 / self.r[name])
                nn.init.zeros_(self.lora_B[name].weight)
            elif init == "pissa":
                self._init_pissa(name)
            else:
                raise ValueError(
                    f"unknown init {init!r}; expected 'kaiming', 'gaussian' or 'pissa'"
                )

    def _init_pissa(self, name: str) -> None:
        self._kind.check_pissa(self.base_layer)
        r, s = self.r[name], self.scaling[name]
        w = self.base_matrix()
        work = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
        if r > min(work.shape):
            raise ValueError(
                f"init='pissa' needs rank <= {min(work.shape)} for a {tuple(work.shape)} weight"
            )
        u, sv, vh = torch.linalg.svd(work, full_matrices=False)
        root = (sv[:r] / s).sqrt()
        a = root[:, None] * vh[:r]
        b = u[:, :r] * root[None, :]
        a_param, b_param = self._a_b_params(name)
        a_param.copy_(a.reshape(a_param.shape).to(a_param.dtype))
        b_param.copy_(b.reshape(b_param.shape).to(b_param.dtype))
        self._write_base_matrix(work - s * (b @ a))

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` and its parameters."""
        if name not in self.r:
            raise KeyError(f"no adapter {name!r} on this layer; present: {list(self.r)}")
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged; call unmerge() before deleting it")
        self._note_change()
        for store in (
            self.lora_A,
            self.lora_B,
            self.lora_embedding_A,
            self.lora_embedding_B,
            self.lora_magnitude_vector,
            self.lora_dropout,
        ):
            if name in store:
                del store[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.use_dora):
            del table[name]
        self.adapter_bits.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter ``name``."""
        params: list[nn.Parameter] = []
        for store in (self.lora_A, self.lora_B):
            if name in store:
                params.extend(store[name].parameters())
        for store in (self.lora_embedding_A, self.lora_embedding_B, self.lora_magnitude_vector):
            if name in store:
                params.append(store[name])
        return params

    # ------------------------------------------------------------------ forward
    def _dropout_p(self, name: str) -> float:
        drop = self.lora_dropout[name]
        return drop.p if isinstance(drop, nn.Dropout) and self.training else 0.0

    def _drop(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Adapter ``name``'s dropout on ``x``: the values ``nn.Dropout`` gives, drawn faster."""
        p = self._dropout_p(name)
        return dropout(x, p) if p > 0.0 else x

    def _branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``B(A(x))`` without scale."""
        a, b = self.adapter_weights(name)
        a_mod = self.lora_A[name] if name in self.lora_A else None
        b_mod = self.lora_B[name] if name in self.lora_B else None
        return self._kind.branch(self.base_layer, a_mod, b_mod, a, b, x)

    def _base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self._kind.base_without_bias(self.base_layer, self.base_matrix(), x)

    def _channel_view(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        return self._kind.channel_view(v, ndim)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus the scaled output of every active, unmerged adapter.

        While :attr:`row_hook` is set (inside :func:`loraq.adapter_rows`: each batch row uses its
        own adapter) the hook computes the output instead.
        """
        hook = self.row_hook
        if hook is not None and not self.adapters_disabled:
            return hook(self, x, *args, **kwargs)
        if self.adapters_disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [n for n in self.active_adapters if n in self.r and n not in self.merged_adapters]
        if not active:
            out = self.base_layer(x, *args, **kwargs)
            if not self.merged_adapters:
                return out
            trainable = [
                p
                for n in self.merged_adapters
                for p in self.adapter_parameters(n)
                if p.requires_grad
            ]
            return guard_merged(out, self.merged_adapters, trainable)

        first = active[0]
        fused_base = None if (args or kwargs or self.use_dora[first]) else self._fusable_base(x)
        if fused_base is not None:
            weight, bias = fused_base
            a, b = self.adapter_weights(first)
            result = lora_linear(
                x,
                a,
                b,
                self.scaling[first],
                weight=weight,
                bias=bias,
                dropout_p=self._dropout_p(first),
            )
            active = active[1:]
        else:
            result = self.base_layer(x, *args, **kwargs)

        for name in active:
            if self.use_dora[name]:
                result = self._add_dora(name, x, result)
            elif self._kind.fused_adapter:
                a, b = self.adapter_weights(name)
                result = lora_linear(
                    x.to(a.dtype),
                    a,
                    b,
                    self.scaling[name],
                    base_out=result,
                    dropout_p=self._dropout_p(name),
                )
            else:
                is_ids = name in self.lora_embedding_A  # token ids: no dropout, no cast
                x_in = x if is_ids else self._drop(name, x.to(self._adapter_dtype()))
                delta = self._branch(name, x_in) * self.scaling[name]
                result = result + delta.to(result.dtype)
        return result

    def _fusable_base(self, x: torch.Tensor):
        """``(weight or weight-callable, bias)`` when base and adapter can run as one fused op."""
        return self._kind.fused_base(self.base_layer, x, self._adapter_dtype())

    def _add_dora(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # DoRA: W' = m * (W + sBA) / ||W + sBA||_row, the norm detached (paper §4.3), written as a
        # correction of the base output (PEFT's form) so the base matmul is not repeated.
        dtype = self._adapter_dtype()
        s = self.scaling[name]
        with torch.no_grad():
            norm = (self.base_matrix().to(dtype) + self.delta_matrix(name)).norm(dim=1)
        mag_scale = self.lora_magnitude_vector[name] / norm
        x_a = x.to(dtype)
        x_drop = self._drop(name, x_a)
        if self._dropout_p(name) == 0.0:
            base_nb = result.to(dtype)
            bias = self.bias
            if bias is not None:
                base_nb = base_nb - self._channel_view(bias.to(dtype), base_nb.ndim)
        else:
            base_nb = self._base_without_bias(x_drop)
        lora_out = self._branch(name, x_drop)
        scale = self._channel_view(mag_scale, base_nb.ndim)
        extra = (scale - 1) * base_nb + scale * lora_out * s
        return result + extra.to(result.dtype)

    # ------------------------------------------------------------------ merge / unmerge
    def merge(self, names: list[str] | None = None) -> float:
        """Fold the given (default: active) adapters into the base weight.

        Returns the largest absolute change the base's re-quantization made to the merged
        weight (0.0 for a dense base, where the merge is exact up to float rounding).
        """
        names = [
            n
            for n in (names or self.active_adapters)
            if n in self.r and n not in self.merged_adapters
        ]
        requant_error = 0.0
        for name in names:
            w = self.base_matrix()
            work_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
            w = w.to(work_dtype)
            merged = w + self.delta_matrix(name).detach().to(work_dtype)
            if self.use_dora[name]:
                norm = merged.norm(dim=1)
                self._dora_merge_norms[name] = norm
                merged = (
                    merged
                    * (self.lora_magnitude_vector[name].detach().to(work_dtype) / norm)[:, None]
                )
            self._write_base_matrix(merged)
            if self.is_quantized:
                requant_error = max(
                    requant_error, float((self.base_matrix().to(work_dtype) - merged).abs().max())
                )
            self.merged_adapters.append(name)
        return requant_error

    def unmerge(self) -> None:
        """Undo :meth:`merge` (last merged first)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            w = self.base_matrix()
            work_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
            w = w.to(work_dtype)
            if self.use_dora[name]:
                norm = self._dora_merge_norms.pop(name).to(work_dtype)
                w = w * (norm / self.lora_magnitude_vector[name].detach().to(work_dtype))[:, None]
            self._write_base_matrix(w - self.delta_matrix(name).detach().to(work_dtype))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, adapters={ {n: self.r[n] for n in self.r} }, active={self.active_adapters}"
