"""Compiled decoder layer of a decode step (``lean_layer.c``), the fast twin of the lean step.

:mod:`loraq.generation.lean_step` runs a Llama-family decode step as a loop of PyTorch
operations; for a batch of a few rows on a small model their Python and dispatch cost more than
their arithmetic. ``lean_layer.c`` runs one whole decoder layer in one call: the same arithmetic
in float32, the projections through the packed GGUF matmul of :mod:`loraq.native.dequant` (or
over float32 weights),
each row's LoRA adapter from the stacked weights of :mod:`loraq.batching.stacks`. Its results
equal the PyTorch step's within float32 rounding (tests compare the two).

A layer is described by a spec, an int64 tensor of :data:`SPEC_SIZE` values: the
:data:`LAYER_FIELDS`, then for each of :data:`PROJECTIONS` its :data:`PROJECTION_FIELDS`
(pointers as addresses, 0 for none; floats as the bits of a double). :func:`layer_spec` builds it
from dicts. Built on first use like every kernel (:mod:`loraq.native.build`, ``LORAQ_KERNELS``).
"""

from __future__ import annotations

import ctypes
import functools
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from .build import load_library, shares_torch_openmp

__all__ = [
    "DENSE_KIND",
    "LAYER_FIELDS",
    "PROJECTIONS",
    "PROJECTION_FIELDS",
    "SPEC_SIZE",
    "available",
    "layer_spec",
    "run_layer",
]

_SOURCE = Path(__file__).with_name("lean_layer.c")

#: The layer's own fields, in the order of the spec (``lean_layer.c``'s ``L_*``).
LAYER_FIELDS = (
    "matmul",  # address of the packed matmul (dequant.packed_matmul), 0 with dense weights only
    "hidden",
    "heads",
    "kv_heads",
    "head_dim",
    "intermediate",
    "eps",  # float
    "scaling",  # float
    "norm_in",  # float32 (hidden,)
    "norm_post",  # float32 (hidden,)
    "q_norm",  # float32 (head_dim,) or 0
    "k_norm",  # float32 (head_dim,) or 0
    "qk_eps",  # float
    "keys",  # float32 buffer (rows, kv_heads, capacity, head_dim), unit stride in head_dim
    "values",
    "cache_row_stride",  # elements between rows of both buffers
    "cache_head_stride",  # elements between kv heads of both buffers
)
#: Each projection's fields (``P_*``): its packed blocks and kind, its shape, its bias, and its
#: rows' adapters: stacked A ``(slots, rank, in)``, B ``(slots, rank, out)``, each row's slot
#: and, or 0, each slot's own rank (int64 ``(slots,)``: the stack's rows past it are zeros).
PROJECTION_FIELDS = (
    "blocks",
    "kind",
    "out",
    "in",
    "bias",
    "lora_a",
    "lora_b",
    "rank",
    "row_slots",
    "slot_ranks",
)
#: A projection's ``kind`` for float32 weights (``blocks`` then holds their address, rows of
#: ``in`` values); any other kind is the packed matmul's (:func:`~loraq.native.dequant.packed_matmul`).
DENSE_KIND = -1
#: The projections of a layer, in the order of the spec.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Number of int64 values in a layer spec.
SPEC_SIZE = len(LAYER_FIELDS) + len(PROJECTIONS) * len(PROJECTION_FIELDS)
_FLOAT_FIELDS = frozenset({"eps", "scaling", "qk_eps"})


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library(_SOURCE, "decode layer", openmp=shares_torch_openmp())
    if lib is None:
        return None
    lib.loraq_lean_spec_size.argtypes, lib.loraq_lean_spec_size.restype = [], ctypes.c_int64
    if lib.loraq_lean_spec_size() != SPEC_SIZE:  # the C layout and this one drifted apart
        raise RuntimeError(
            f"lean_layer.c has a spec of {lib.loraq_lean_spec_size()} values, "
            f"lean_layer.py one of {SPEC_SIZE}"
        )
    lib.loraq_lean_layer.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64] + [
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.loraq_lean_layer.restype = ctypes.c_int
    lib.loraq_lora_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.loraq_lora_rows.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the compiled layer is in use (builds it on the first call)."""
    return _library() is not None


def _value(name: str, value) -> int:
    if name in _FLOAT_FIELDS:
        return struct.unpack("<q", struct.pack("<d", float(value)))[0]
    return int(value)


def layer_spec(layer: Mapping[str, float | int], projections: list[Mapping[str, int]]) -> list[int]:
    """The spec values of one layer: ``layer`` maps every name of :data:`LAYER_FIELDS`, and
    ``projections`` holds one mapping of :data:`PROJECTION_FIELDS` per :data:`PROJECTIONS` entry.

    Raises:
        KeyError: naming a missing field.
        ValueError: for a wrong number of projections.
    """
    if len(projections) != len(PROJECTIONS):
        raise ValueError(
            f"a layer spec needs {len(PROJECTIONS)} projections, got {len(projections)}"
        )
    values = [_value(name, layer[name]) for name in LAYER_FIELDS]
    for record in projections:
        values.extend(int(record[name]) for name in PROJECTION_FIELDS)
    return values


def run_layer(
    spec: torch.Tensor,
    x: torch.Tensor,
    length: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keep: torch.Tensor,
) -> None:
    """Run one decoder layer in place on ``x`` (float32 ``(rows, hidden)``, contiguous).

    ``spec``: int64 ``(SPEC_SIZE,)`` from :func:`layer_spec`; its key and value buffers hold
    ``length`` positions per row and room for one more, which this writes. ``cos``, ``sin``:
    float32 ``(rows, head_dim)``; ``keep``: uint8 ``(rows, length + 1)``, 1 where a position is
    a real token. Every tensor must be contiguous on CPU and every pointer in ``spec`` must stay
    valid for the call: this is the caller's contract, checked by shape here and nowhere else.

    Raises:
        RuntimeError: when the compiled layer is unavailable, or out of memory for its scratch.
        ValueError: for tensors of the wrong dtype or shape.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the compiled decode layer is unavailable (see loraq.native.build)")
    rows = x.shape[0]
    checks = (
        (spec, torch.int64, (SPEC_SIZE,)),
        (x, torch.float32, (rows, x.shape[-1])),
        (cos, torch.float32, (rows, cos.shape[-1])),
        (sin, torch.float32, tuple(cos.shape)),
        (keep, torch.uint8, (rows, length + 1)),
    )
    for tensor, dtype, shape in checks:
        if tensor.dtype != dtype or tuple(tensor.shape) != shape or not tensor.is_contiguous():
            raise ValueError(
                f"run_layer: expected a contiguous {dtype} tensor of shape {shape}, got "
                f"{tensor.dtype} {tuple(tensor.shape)}"
            )
    status = lib.loraq_lean_layer(
        spec.data_ptr(), x.data_ptr(), rows, length, cos.data_ptr(), sin.data_ptr(), keep.data_ptr()
    )
    if status != 0:
        raise RuntimeError("the compiled decode layer ran out of memory for its scratch")


def lora_rows(
    x: torch.Tensor,
    out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    row_slots: torch.Tensor,
    slot_ranks: torch.Tensor | None = None,
) -> None:
    """Add each row's LoRA delta into ``out`` in place, reading its adapter from the stacks.

    ``x``: float32 ``(rows, tokens, in)``; ``out``: float32 ``(rows, tokens, out)``; ``a``:
    ``(slots, rank, in)`` and ``b``: ``(slots, rank, out)`` stacked as
    :mod:`loraq.batching.stacks` does (B transposed, its scale folded in); ``row_slots``: int64
    ``(rows,)``, each row's slot; ``slot_ranks``: int64 ``(slots,)``, each slot's own rank (its
    rows past it are zeros and are skipped), or None to read every row. All contiguous on CPU.
    The same sums as ``out += (x @ A_s^T) @ B_s`` row by row, in another order.

    Raises:
        RuntimeError: when the compiled kernels are unavailable.
        ValueError: for tensors of the wrong dtype, shape or layout, or a slot out of range.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the compiled decode layer is unavailable (see loraq.native.build)")
    rows, tokens, n_in = x.shape
    slots, rank, n_out = b.shape
    checks = [
        (x, torch.float32, (rows, tokens, n_in)),
        (out, torch.float32, (rows, tokens, n_out)),
        (a, torch.float32, (slots, rank, n_in)),
        (b, torch.float32, (slots, rank, n_out)),
        (row_slots, torch.int64, (rows,)),
    ]
    if slot_ranks is not None:
        checks.append((slot_ranks, torch.int64, (slots,)))
    for tensor, dtype, shape in checks:
        if (
            tensor.dtype != dtype
            or tuple(tensor.shape) != shape
            or not tensor.is_contiguous()
            or tensor.device.type != "cpu"
        ):
            raise ValueError(
                f"lora_rows: expected a contiguous CPU {dtype} tensor of shape {shape}, got "
                f"{tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"
            )
    status = lib.loraq_lora_rows(
        x.data_ptr(), rows, tokens, n_in, out.data_ptr(), n_out, a.data_ptr(), b.data_ptr(),
        slots, rank, row_slots.data_ptr(), 0 if slot_ranks is None else slot_ranks.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise ValueError(f"lora_rows: row_slots must lie in [0, {slots}), got {row_slots.tolist()}")
