"""``LoraConfig``: what to adapt and how, validated up front with messages that name the field."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.patterns import unsafe_regex_reason
from ..core.precision import COMPUTE_DTYPE_NAMES
from ..layers.lora import adapter_scaling
from ..quant.codebooks import VALID_BLOCKSIZES
from ..quant.formats import format_names

#: Values accepted by ``LoraConfig.init``.
INIT_METHODS = ("kaiming", "gaussian", "pissa", "loftq")
#: Values accepted by ``LoraConfig.bias``.
BIAS_MODES = ("none", "all", "lora_only")
#: Values accepted by ``LoraConfig.quant``: a dense base, or a format loraq quantizes into.
QUANT_TYPES = (None, *format_names(quantize=True))
#: Values accepted by ``LoraConfig.compute_dtype`` (``auto``: bf16 where the hardware runs it fast).
COMPUTE_DTYPES = COMPUTE_DTYPE_NAMES
#: Blocksizes accepted for blockwise quantization (as bitsandbytes).
BLOCKSIZES = VALID_BLOCKSIZES


def _bad(field_name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"LoraConfig.{field_name}={value!r} is invalid: expected {expected}")


@dataclass
class LoraConfig:
    """Settings for low-rank adapters (LoRA) and, optionally, a quantized frozen base (QLoRA).

    Adapter math follows the LoRA paper and PEFT: ``y = base(x) + scaling * B(A(dropout(x)))``
    with ``scaling = alpha / r`` (``alpha / sqrt(r)`` when ``use_rslora``).

    Args:
        r: adapter rank (> 0).
        alpha: scaling numerator (> 0).
        dropout: dropout probability on the adapter input, in [0, 1).
        targets: which modules get adapters: a list of module-name suffixes (``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``), a regular expression matched against the full
            dotted name, or ``"all-linear"`` (every Linear / GPT-2 Conv1D except the output head).
        exclude: module names (same rules as a list ``targets``) or a regex that never get adapters.
        bias: which bias terms train: ``"none"``, ``"all"``, or ``"lora_only"`` (biases of adapted
            modules only).
        modules_to_save: modules trained in full and saved with the adapter (e.g. a
            classification head ``["classifier"]``).
        init: adapter initialisation: ``"kaiming"`` (PEFT's default), ``"gaussian"``,
            ``"pissa"`` (top-r singular vectors of W; the base keeps the residual), or
            ``"loftq"`` (needs ``quant``: the base is quantized so that ``Q + scaling·B·A`` is
            as close to W as possible, see :mod:`loraq.layers.loftq`).
        loftq_iters: LoftQ's alternations of quantize / truncated SVD (>= 1; 5 is LoftQ's
            usual choice); used with ``init="loftq"`` only.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        use_dora: weight-decomposed adapters (DoRA) with a learned magnitude per output row.
        quant: store the frozen base's Linear weights in a base format loraq writes (the
            ``quantize`` column of :mod:`loraq.quant.formats`): blockwise ``nf4``, ``fp4`` or
            ``int8`` (bitsandbytes-compatible), or GGUF blocks ``q8_0``, ``q4_0`` or ``q4_1``
            (llama.cpp's formats; ``blocksize`` and ``double_quant`` do not apply, and a layer
            whose input width is not a multiple of the block size stays dense); ``None`` for a
            dense base.
        double_quant: also quantize the 4-bit block scales (QLoRA's double quantization).
        blocksize: elements per quantization block (a power of two in 32..4096), or ``None``
            for the format's default (64 for 4-bit, 256 for ``int8``; see the table).
        compute_dtype: dtype of the dequantized base weight in the matmul; ``"auto"`` picks
            ``bfloat16`` where the device runs it natively, else ``float32`` (see
            :mod:`loraq.core.precision`).
        quant_skip: module names (suffix rules) that stay dense when ``quant`` is set.
        adapter_bits: keep adapter weights on a symmetric k-bit grid (2..8) in the forward pass
            (straight-through estimator), or ``None`` for float adapters.
        quant_embeddings: also store frozen ``nn.Embedding`` tables in NF4 (in ``quant``'s
            block format for the GGUF formats).
        target_parameters: parameters (not modules) that get adapters, as PEFT's
            ``target_parameters``: names ``"<module>.<param>"`` matched as a dotted suffix of the
            full name (``"mlp.experts.gate_up_proj"``). A 3-D expert stack ``(E, ., .)`` gets one
            rank-``r`` pair per expert, a 2-D weight one pair (see
            :mod:`loraq.layers.param_lora`). ``targets=[]`` then adapts no module. Needs
            ``dropout=0`` and no DoRA, PiSSA, LoftQ or ``adapter_bits`` (the delta is added to
            the parameter, not to an output).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: str | list[str] = "all-linear"
    exclude: str | list[str] | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init: str = "kaiming"
    loftq_iters: int = 1
    use_rslora: bool = False
    use_dora: bool = False
    quant: str | None = None
    double_quant: bool = True
    blocksize: int | None = None
    compute_dtype: str = "float32"
    quant_skip: list[str] | None = None
    adapter_bits: int | None = None
    quant_embeddings: bool = False
    target_parameters: list[str] | None = None
    # PEFT fields that have no loraq setting are kept here so a PEFT file round-trips.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def scaling(self) -> float:
        """The factor applied to ``B @ A``: ``alpha / r`` or ``alpha / sqrt(r)`` with rsLoRA."""
        return adapter_scaling(self.alpha, self.r, self.use_rslora)

    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the first bad field and value."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise _bad("r", self.r, "a positive integer")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            raise _bad("alpha", self.alpha, "a finite positive number")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise _bad("dropout", self.dropout, "a probability in [0, 1)")
        self._check_target_parameters()
        if not (self.targets == [] and self.target_parameters):  # []: parameters only
            self.targets = _check_names("targets", self.targets, allow_all_linear=True)
        if self.exclude is not None:
            self.exclude = _check_names("exclude", self.exclude, allow_all_linear=False)
        if self.bias not in BIAS_MODES:
            raise _bad("bias", self.bias, f"one of {BIAS_MODES}")
        for name in ("modules_to_save", "quant_skip"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
                raise _bad(name, value, "a list of module names")
            setattr(self, name, list(value))
        if self.init not in INIT_METHODS:
            raise _bad("init", self.init, f"one of {INIT_METHODS}")
        if (
            isinstance(self.loftq_iters, bool)
            or not isinstance(self.loftq_iters, int)
            or self.loftq_iters < 1
        ):
            raise _bad("loftq_iters", self.loftq_iters, "a positive integer")
        if self.init == "loftq" and self.use_dora:
            raise _bad("use_dora", self.use_dora, "False with init='loftq'")
        for name in ("use_rslora", "use_dora", "double_quant", "quant_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "True or False")
        if self.quant not in QUANT_TYPES:
            raise _bad("quant", self.quant, f"one of {QUANT_TYPES}")
        if self.blocksize is not None and self.blocksize not in BLOCKSIZES:
            raise _bad("blocksize", self.blocksize, f"None or one of {BLOCKSIZES}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise _bad("compute_dtype", self.compute_dtype, f"one of {COMPUTE_DTYPES}")
        if self.adapter_bits is not None and (
            isinstance(self.adapter_bits, bool)
            or not isinstance(self.adapter_bits, int)
            or not 2 <= self.adapter_bits <= 8
        ):
            raise _bad("adapter_bits", self.adapter_bits, "None or an integer in 2..8")
        if not isinstance(self.extra, dict):
            raise _bad("extra", self.extra, "a dict")
        self._check_parameter_conflicts()

    def _check_target_parameters(self) -> None:
        value = self.target_parameters
        if value is None:
            return
        if isinstance(value, str):
            value = [value]
        if (
            not isinstance(value, (list, tuple))
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            raise _bad("target_parameters", value, "None or a non-empty list of parameter names")
        self.target_parameters = list(value)

    def _check_parameter_conflicts(self) -> None:
        if self.target_parameters is None:
            return
        # The delta is added to the parameter, so nothing can act on the adapter's own input
        # or output (PEFT refuses the same).
        conflicts = {
            "dropout": (self.dropout != 0, "0 with target_parameters"),
            "use_dora": (self.use_dora, "False with target_parameters"),
            "init": (
                self.init not in ("kaiming", "gaussian"),
                "'kaiming' or 'gaussian' with target_parameters",
            ),
            "adapter_bits": (self.adapter_bits is not None, "None with target_parameters"),
        }
        for name, (bad, expected) in conflicts.items():
            if bad:
                raise _bad(name, getattr(self, name), expected)

    def replace(self, **changes: Any) -> LoraConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON/YAML friendly)."""
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Build from a dict; unknown keys raise an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"LoraConfig got unknown field(s) {unknown}; valid fields: {sorted(known)}"
            )
        return cls(**data)


def _check_names(field_name: str, value: Any, *, allow_all_linear: bool) -> str | list[str]:
    if isinstance(value, str):
        if not value:
            raise _bad(field_name, value, "a non-empty module name list, regex or 'all-linear'")
        if value == "all-linear":
            if not allow_all_linear:
                raise _bad(field_name, value, "a list of module names or a regex")
            return value
        try:
            re.compile(value)
        except re.error as err:
            raise _bad(field_name, value, f"a valid regular expression ({err})") from None
        problem = unsafe_regex_reason(value)
        if problem is not None:
            raise _bad(
                field_name, value, f"a regular expression that matches in bounded time ({problem})"
            )
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and value:
        if all(isinstance(v, str) and v for v in value):
            return list(value) if not isinstance(value, (set, frozenset)) else sorted(value)
    raise _bad(
        field_name, value, "a non-empty list of module names, a regex string or 'all-linear'"
    )
