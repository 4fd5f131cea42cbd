"""Per-tensor block formats of a merged GGUF: llama.cpp's quantization recipes, one table.

``llama-quantize model-f32.gguf out.gguf Q4_K_M`` does not write every matrix in q4_k: it
gives the tensors that hurt most when quantized more bits. :func:`plan_tensor_types` makes the
same choice for a list of GGUF tensors (llama.cpp's ``llama_tensor_get_type`` without an
importance matrix, for dense models):

=========  ====  =====================================================================
recipe     base  upgrades (``use_more_bits``: the first and last eighth of the layers
                 and every third one between)
=========  ====  =====================================================================
``q4_k_m``  q4_k  attn_v, ffn_down: q6_k where use_more_bits; output: q6_k
``q4_k_s``  q4_k  attn_v: q5_k in its first 4; ffn_down: q5_k in the first eighth; output q6_k
``q5_k_m``  q5_k  attn_v, ffn_down: q6_k where use_more_bits; output: q6_k
``q5_k_s``  q5_k  output: q6_k
=========  ====  =====================================================================

``output.weight`` (or ``token_embd.weight`` when the embeddings are tied, as llama.cpp treats
them) gets q6_k, or q8_0 when its rows do not fit 256-blocks. Every block format of
:mod:`loraq.quant.formats` is also a recipe of its own, applied *purely* (every matrix in it,
as ``llama-quantize --pure``); for ``q8_0`` and ``q6_k`` that is exactly llama.cpp's own
``Q8_0`` / ``Q6_K``. A matrix whose rows do not fit its format falls back as llama.cpp's
``tensor_type_fallback`` does: q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0, and to f16 when even
32-blocks do not fit. Vectors (norms, biases) are never quantized.

Not modelled (loraq exports none of these): llama.cpp's extra rules for mixture-of-experts
models (``n_expert == 8``), Falcon, and Llama-70B-sized models (attn_v q4_k -> q5_k there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..quant.formats import FORMATS, GGUF, format_names

__all__ = ["FALLBACK_TYPE", "RECIPES", "Recipe", "plan_tensor_types", "recipe_names"]

#: The type a matrix whose rows do not fit 32-blocks is written in.
FALLBACK_TYPE = "f16"
# llama.cpp's tensor_type_fallback: a 256-block format -> the 32-block one it demotes to.
_DEMOTE = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
# The type of output.weight (and of tied token embeddings) in the non-pure recipes.
_OUTPUT_TYPE, _OUTPUT_MISFIT = "q6_k", "q8_0"
_OUTPUT, _TOKEN_EMBD = "output.weight", "token_embd.weight"


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth of ``n``
    and every third layer between them."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class Upgrade:
    """A tensor category's upgrade: ``to`` where ``when(i, n)`` holds for its i-th of n."""

    to: str
    when: Callable[[int, int], bool]


@dataclass(frozen=True)
class Recipe:
    """One recipe: the ``base`` block format and the upgrades of the sensitive tensors.

    ``pure`` recipes write every matrix in ``base``; ``file_type`` is llama.cpp's
    ``general.file_type`` (``LlamaFileType``) or None where llama.cpp has none.
    """

    name: str
    base: str
    file_type: int | None = None
    pure: bool = True
    attn_v: Upgrade | None = None
    ffn_down: Upgrade | None = None


_MORE_BITS_Q6 = Upgrade("q6_k", use_more_bits)
# llama.cpp's LlamaFileType of the block formats whose pure recipe is its own ftype.
_PURE_FILE_TYPES = {"q8_0": 7, "q6_k": 18}

#: Every recipe by name: the pure block formats, then llama.cpp's mixed k-quant recipes.
RECIPES: dict[str, Recipe] = {
    **{
        name: Recipe(name, name, _PURE_FILE_TYPES.get(name))
        for name in format_names(kind=GGUF, gguf_export=True)
    },
    "q4_k_m": Recipe("q4_k_m", "q4_k", 15, False, _MORE_BITS_Q6, _MORE_BITS_Q6),
    "q4_k_s": Recipe(
        "q4_k_s",
        "q4_k",
        14,
        False,
        Upgrade("q5_k", lambda i, n: i < 4),
        Upgrade("q5_k", lambda i, n: i < n // 8),
    ),
    "q5_k_m": Recipe("q5_k_m", "q5_k", 17, False, _MORE_BITS_Q6, _MORE_BITS_Q6),
    "q5_k_s": Recipe("q5_k_s", "q5_k", 16, False),
}


def recipe_names(mixed: bool | None = None) -> tuple[str, ...]:
    """Recipe names (``mixed``: only the non-pure ones; False: only the pure ones)."""
    return tuple(n for n, r in RECIPES.items() if mixed is None or r.pure != mixed)


def _fits(name: str, cols: int) -> bool:
    return cols % FORMATS[name].blocksize == 0


def _fallback(name: str, cols: int) -> str:
    """llama.cpp's ``tensor_type_fallback``: demote a format whose blocks the rows do not fit."""
    if _fits(name, cols):
        return name
    demoted = _DEMOTE.get(name, name)
    return demoted if _fits(demoted, cols) else FALLBACK_TYPE


def _quantizable(name: str, shape: Sequence[int]) -> bool:
    # llama.cpp's tensor_allows_quantization, for the tensors of the architectures loraq writes
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def plan_tensor_types(
    recipe: str, tensors: Sequence[tuple[str, Sequence[int]]], n_layer: int
) -> dict[str, str | None]:
    """The type of each GGUF tensor under ``recipe``: a block format, ``"f16"`` (rows fit no
    block), or None (a vector: written dense). ``tensors`` are (name, torch shape) in the
    order of the file (llama.cpp counts attn_v and ffn_down tensors in that order);
    ``n_layer`` is the model's block count."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown GGUF recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
    r = RECIPES[recipe]
    names = [name for name, _ in tensors]
    tied = _OUTPUT not in names
    n_attn_v = sum(1 for n in names if "attn_qkv.weight" in n or "attn_v.weight" in n)
    i_attn_v = i_ffn_down = 0
    plan: dict[str, str | None] = {}
    for name, shape in tensors:
        if not _quantizable(name, shape):
            plan[name] = None
            continue
        cols = shape[-1]
        kind = r.base
        if r.pure:
            pass
        elif name == _OUTPUT or (tied and name == _TOKEN_EMBD):
            kind = _OUTPUT_MISFIT if not _fits(r.base, cols) else _OUTPUT_TYPE
        elif "attn_qkv.weight" in name or "attn_v.weight" in name:
            if r.attn_v is not None and r.attn_v.when(i_attn_v, n_attn_v):
                kind = r.attn_v.to
            i_attn_v += 1
        elif "ffn_down" in name and "ffn_up" not in name and "ffn_gate" not in name:
            if r.ffn_down is not None and r.ffn_down.when(i_ffn_down, n_layer):
                kind = r.ffn_down.to
            i_ffn_down += 1
        plan[name] = _fallback(kind, cols)
    return plan
