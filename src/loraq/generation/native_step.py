"""Which decoder layers of a lean decode step the compiled layer runs, and their specs.

:class:`~loraq.generation.lean_step.LeanDecodeStep` hands each decoder layer to the compiled
layer of :mod:`loraq.native.lean_layer` when the layer and the step qualify, and runs it as
PyTorch operations otherwise, layer by layer (the two share the residual stream and the key and
value buffers). A layer qualifies when:

* every projection is a :class:`~loraq.layers.gguf.LinearGGUF` in float32 whose blocks the
  packed matmul reads, or a plain ``nn.Linear`` with float32 weights, bare or under a
  :class:`~loraq.layers.lora.LoRALayer` in eval mode whose adapters are off or merged, or run
  per row by a mixed-adapter batch
  (:func:`loraq.adapter_rows`, as every decode batch does) with plain LoRA adapters (no DoRA);
* its norms are RMSNorms and its MLP the SiLU-gated one of the Llama family.

The step qualifies with at most :data:`NATIVE_MAX_ROWS` rows of float32 activations. Anything
else (another base, a ``modules_to_save`` copy in a projection's place, DoRA, bfloat16) runs as
before. ``LORAQ_LEAN_NATIVE`` (spelled as every switch, :mod:`loraq.core.switches`): ``auto``
(default) uses the compiled layer where it qualifies and the kernels build, ``off`` never,
``on`` as ``auto`` but an error where the compiled layer cannot be built.
"""

from __future__ import annotations

import torch
from torch import nn

from ..batching.mixed import MixedBatch
from ..core.switches import read_switch
from ..layers.gguf import PACKED_MAX_ROWS, LinearGGUF
from ..layers.lora import LoRALayer
from ..native import lean_layer
from ..native.build import MODE_ENV, KernelUnavailableError
from ..native.dequant import packed_matmul
from .lean_model import MLP, is_rms_norm

__all__ = ["DENSE_MAX_WORK", "NATIVE_ENV", "NATIVE_MAX_ROWS", "NativeLayers", "native_layers"]

#: Environment variable choosing ``auto`` / ``off`` (see the module docstring).
NATIVE_ENV = "LORAQ_LEAN_NATIVE"
#: Most rows a step runs through the compiled layer: its projections read the blocks packed,
#: which the GGUF layers themselves stop doing above this many rows (the whole weight is then
#: dequantized once and BLAS amortises it over the rows).
NATIVE_MAX_ROWS = PACKED_MAX_ROWS
#: Most multiply-adds (rows x in x out) of a float32 projection the compiled layer runs: it
#: multiplies with vector dot products, and past this BLAS's blocked matmul, which reuses each
#: loaded weight across many rows, costs less than the Python the compiled layer saves.
DENSE_MAX_WORK = 1 << 24
_MLPS = frozenset(f"{name}MLP" for name in ("Llama", "Mistral", "Qwen2", "Qwen3"))
_CPU = torch.device("cpu")
_BUFFER_NAMES = ("keys", "values", "cache_row_stride", "cache_head_stride")
_BUFFER_FIELDS = tuple(lean_layer.LAYER_FIELDS.index(name) for name in _BUFFER_NAMES)
_NO_LORA = {"lora_a": 0, "lora_b": 0, "rank": 0, "row_slots": 0, "slot_ranks": 0}


def _norm(module: nn.Module | None) -> tuple[int, float] | None:
    """``(weight address, eps)`` of an RMSNorm in float32, else None."""
    if not is_rms_norm(module):
        return None
    if not _float32_cpu(module.weight):
        return None
    return module.weight.data_ptr(), float(module.variance_epsilon)


def _adapters(module: LoRALayer, base: nn.Module, rows: int) -> dict[str, int] | None:
    """The LoRA fields of a projection under ``module`` (over ``base``); None when it cannot
    run compiled."""
    if module.training:  # adapter dropout
        return None
    hook = module.row_hook
    if module.adapters_disabled:
        return None if module.merged_adapters else _NO_LORA  # the forward would unmerge them
    if hook is None:
        unmerged = [n for n in module.active_adapters if n in module.r]
        return None if set(unmerged) - set(module.merged_adapters) else _NO_LORA
    if not isinstance(hook, MixedBatch):
        return None
    selection = hook.select(module, _CPU)
    if selection is None or selection[2] == 0:  # none of the plan's adapters, or all rows bare
        return _NO_LORA
    stack, row_slots, _ = selection
    a, b = stack.a, stack.b
    fits = (
        stack.dora is None
        and a.dtype == b.dtype == torch.float32
        and a.is_contiguous()
        and b.is_contiguous()
        and row_slots.dtype == torch.long
        and row_slots.is_contiguous()
        and tuple(row_slots.shape) == (rows,)
        and a.shape[2] == getattr(base, "in_features", None)
        and b.shape[2] == getattr(base, "out_features", None)
    )
    if not fits:
        return None
    ranks = stack.ranks
    if ranks is not None and not (
        ranks.dtype == torch.long and ranks.is_contiguous() and tuple(ranks.shape) == (a.shape[0],)
    ):
        ranks = None  # read every row of the stack
    return {
        "lora_a": a.data_ptr(),
        "lora_b": b.data_ptr(),
        "rank": a.shape[1],
        "row_slots": row_slots.data_ptr(),
        "slot_ranks": 0 if ranks is None else ranks.data_ptr(),
    }


def _projection(module: nn.Module, rows: int, matmul: list[int]) -> dict[str, int] | None:
    """A projection's spec fields, or None; ``matmul`` collects the packed matmul's address."""
    lora = _NO_LORA
    base = module
    if isinstance(module, LoRALayer):
        base = module.base_layer
        lora = _adapters(module, base, rows)
        if lora is None:
            return None
    weights = _weights(base, rows, matmul)
    bias = getattr(base, "bias", None)
    if weights is None or (bias is not None and not _float32_cpu(bias)):
        return None
    return {
        **weights,
        "out": base.out_features,
        "in": base.in_features,
        "bias": 0 if bias is None else bias.data_ptr(),
        **lora,
    }


def _float32_cpu(tensor: torch.Tensor) -> bool:
    return (
        type(tensor) in (torch.Tensor, nn.Parameter)  # real memory, not a subclass's
        and tensor.dtype == torch.float32
        and tensor.device.type == "cpu"
        and tensor.is_contiguous()
    )


def _weights(base: nn.Module, rows: int, matmul: list[int]) -> dict[str, int] | None:
    """``blocks`` and ``kind`` of a bare projection: GGUF blocks read packed, or float32
    weights of a plain ``nn.Linear`` (up to :data:`DENSE_MAX_WORK`); None for anything else."""
    if type(base) is nn.Linear:
        work = rows * base.in_features * base.out_features
        if not _float32_cpu(base.weight) or work > DENSE_MAX_WORK:
            return None
        return {"blocks": base.weight.data_ptr(), "kind": lean_layer.DENSE_KIND}
    if not isinstance(base, LinearGGUF) or type(base).forward is not LinearGGUF.forward:
        return None
    packed = base.packed_blocks()
    found = None if packed is None else packed_matmul(packed[1])
    if found is None:
        return None
    matmul.append(found[0])
    return {"blocks": packed[0].data_ptr(), "kind": found[1]}


def _tensors(module: nn.Module) -> tuple[torch.Tensor, ...]:
    """The tensors whose addresses a projection's record holds: its weight (or GGUF blocks)
    and bias, under a LoRA layer its base layer's. A layout keeps them referenced, so that
    none is freed while a spec points into it."""
    base = module.base_layer if isinstance(module, LoRALayer) else module
    packed = base.packed_blocks() if isinstance(base, LinearGGUF) else None
    weight = packed[0] if packed is not None else getattr(base, "weight", None)
    bias = getattr(base, "bias", None)
    return tuple(t for t in (weight, bias) if isinstance(t, torch.Tensor))


def _state(module: nn.Module) -> tuple:
    """What a projection's spec fields depend on that may change between steps: the module
    and, under a LoRA layer, its adapters' state (a merge re-quantizes GGUF blocks into new
    tensors, and shows in ``merged_adapters``)."""
    if not isinstance(module, LoRALayer):
        return (module,)
    hook = module.row_hook
    merged = tuple(module.merged_adapters)
    if isinstance(hook, MixedBatch):
        hook.select(module, _CPU)  # brings the batch's stacks up to date
        generation = hook.cache.generation
        return (module, hook, generation, merged, module.adapters_disabled, module.training)
    active = tuple(module.active_adapters)
    return (module, hook, merged, active, module.adapters_disabled, module.training)


class NativeLayers:
    """Builds the compiled layer's spec for each decoder layer of one model, step by step."""

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        self.hidden = config.hidden_size
        self.intermediate = config.intermediate_size
        self._silu = getattr(config, "hidden_act", "silu") == "silu"
        # per decoder layer: (what its spec was built from, the spec or None), and the same
        # for its layout (the spec less its key/value buffers); see spec()
        self._specs: dict[nn.Module, tuple[tuple, torch.Tensor | None]] = {}
        self._layouts: dict[nn.Module, tuple[tuple, list[int] | None, list]] = {}

    def clear(self) -> None:
        """Forget the kept specs (their buffers are let go: the batch is empty). The layouts
        stay: the next request on the same adapters needs them again."""
        self._specs.clear()

    def runs(self, x: torch.Tensor) -> bool:
        """Whether a step on residual stream ``x`` ``(rows, 1, hidden)`` may use compiled layers."""
        return (
            x.dtype == torch.float32
            and x.device.type == "cpu"
            and 0 < x.shape[0] <= NATIVE_MAX_ROWS
            and x.shape[-1] == self.hidden
        )

    def spec(
        self,
        layer: nn.Module,
        shape: tuple[int, int, int, float],
        keys: torch.Tensor,
        values: torch.Tensor,
        rows: int,
    ) -> torch.Tensor | None:
        """The spec of decoder ``layer`` (attention ``shape``: heads, key/value heads, head
        dim, scaling) with its key and value buffers, or None when it does not qualify (see the
        module doc). The buffers: float32 ``(rows, kv_heads, capacity, head_dim)``, alike in
        strides, unit stride in the last dimension.

        A layer's spec is kept from step to step and built again only when something it was
        built from changed: a module in the layer, a LoRA layer's row hook, adapter state or
        stacked weights (the batch's stack generation), the row count, or (rebuilding only
        their fields) the buffers.
        """
        attn, mlp = layer.self_attn, layer.mlp
        modules = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        modules += (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        norms = (
            layer.input_layernorm,
            layer.post_attention_layernorm,
            getattr(attn, "q_norm", None),
            getattr(attn, "k_norm", None),
        )
        built_from = (
            norms,
            mlp,
            tuple(_state(m) for m in modules),
            rows,
        )
        key = (built_from, keys.data_ptr(), values.data_ptr(), keys.stride(), tuple(keys.shape))
        kept = self._specs.get(layer)
        if kept is not None and kept[0] == key:
            return kept[1]
        # new buffers alone (a prefill's, a grown one) keep the rest of the spec
        layout = self._layouts.get(layer)
        if layout is None or layout[0] != built_from:
            # the layout holds the tensors its addresses point into: none can be freed under it
            held = [t for m in modules for t in _tensors(m)]
            held += [
                n.weight for n in norms if isinstance(getattr(n, "weight", None), torch.Tensor)
            ]
            layout = (built_from, self._layout(layer, modules, shape, rows), held)
            self._layouts[layer] = layout
        spec = None
        if layout[1] is not None and _buffers_fit(keys, values, rows, shape):
            values_ = list(layout[1])
            buffer_fields = (keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1))
            for index, value in zip(_BUFFER_FIELDS, buffer_fields):
                values_[index] = value
            spec = torch.tensor(values_, dtype=torch.int64)
        self._specs[layer] = (key, spec)
        return spec

    def _layout(self, layer, modules, shape, rows) -> list[int] | None:
        """The spec values of ``layer`` with its buffer fields 0, or None (not qualified)."""
        heads, kv_heads, head_dim, scaling = shape
        if not self._silu or not (type(layer.mlp) is MLP or type(layer.mlp).__name__ in _MLPS):
            return None
        attn = layer.self_attn
        norm_in, norm_post = _norm(layer.input_layernorm), _norm(layer.post_attention_layernorm)
        if norm_in is None or norm_post is None:
            return None
        q_norm = getattr(attn, "q_norm", None)
        qk = (0, 0.0), (0, 0.0)
        if q_norm is not None:
            qk = _norm(q_norm), _norm(getattr(attn, "k_norm", None))
            if None in qk:
                return None
        if norm_post[1] != norm_in[1] or qk[0][1] != qk[1][1]:
            return None  # one eps per pair in the spec
        matmul: list[int] = []
        projections = [_projection(m, rows, matmul) for m in modules]
        if None in projections or len(set(matmul)) > 1:
            return None
        fields = {
            "matmul": matmul[0] if matmul else 0,
            "hidden": self.hidden,
            "heads": heads,
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "intermediate": self.intermediate,
            "eps": norm_in[1],
            "scaling": scaling,
            "norm_in": norm_in[0],
            "norm_post": norm_post[0],
            "q_norm": qk[0][0],
            "k_norm": qk[1][0],
            "qk_eps": qk[0][1],
            **dict.fromkeys(_BUFFER_NAMES, 0),
        }
        return lean_layer.layer_spec(fields, projections)


def _buffers_fit(keys: torch.Tensor, values: torch.Tensor, rows: int, shape) -> bool:
    _, kv_heads, head_dim, _ = shape
    return (
        keys.dtype == values.dtype == torch.float32
        and keys.stride() == values.stride()
        and keys.shape == values.shape
        and keys.stride(-1) == 1
        and tuple(keys.shape[:2]) == (rows, kv_heads)
        and keys.shape[3] == head_dim
    )


def native_layers(model: nn.Module) -> NativeLayers | None:
    """The compiled layers for ``model``'s lean step, or None where ``LORAQ_LEAN_NATIVE`` is
    ``off`` or the compiled layer is unavailable (under ``on``: an error saying so)."""
    switch = read_switch(NATIVE_ENV)
    if switch == "off":
        return None
    if not lean_layer.available():
        if switch == "on":
            raise KernelUnavailableError(
                f"{NATIVE_ENV}=on but the compiled decode layer is unavailable "
                f"(see {MODE_ENV}; set {NATIVE_ENV}=auto to run the layers in PyTorch)"
            )
        return None
    return NativeLayers(model)
