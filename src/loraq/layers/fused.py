"""One autograd function for a LoRA-adapted linear map.

``y = x W^T + b + scaling * (drop(x) A^T) B^T`` as one node in the graph. Compared with composing
``nn.Linear`` modules (PEFT's approach) it:

- folds the scale and the add into ``addmm`` (no separate scale / add passes over the output);
- keeps ``x`` (already alive as the previous op's output) and the small ``x A^T`` for backward,
  plus the dropout mask at one bit per element (one byte without the compiled kernel), instead
  of a full dropped-out copy of ``x``;
- computes the input gradient of base and adapter in one ``addmm``;
- never computes a weight gradient for the frozen base.

The base weight is either a tensor or a zero-argument callable (a quantized base dequantizes on
demand, in forward and again in backward, so no dense copy outlives the call). When the base
output is computed elsewhere, pass it as ``base_out`` and ``weight=None``: the function then only
adds the adapter term.

Under ``torch.autocast`` every matmul runs in the autocast dtype, as autocast would run
``F.linear``, and the output is in that dtype; the adapter parameters stay float32 (master
weights) and receive float32 gradients. Without autocast the base computes in the weight's dtype
and the adapter in its parameters' dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.precision import autocast_dtype
from ..native.bernoulli import apply_keep, keep_mask

# A dense weight, or a callable that returns it on demand, optionally in a requested dtype.
WeightSource = torch.Tensor | Callable[..., torch.Tensor] | None


def _use_merged_weight(
    n_rows: int, weight: torch.Tensor, lora_dtype: torch.dtype, dropout_p: float
) -> bool:
    """Whether to run ``x (W + sBA)^T`` instead of ``x W^T + s (x A^T) B^T``.

    Equal up to rounding, but the merged form skips a pass over the (N, out) output in forward
    and two passes over the (N, in) input gradient in backward, at the price of building the
    (out, in) merged weight: a win once the batch has more rows than about ``out*in/(out+2in)``.
    Dropout feeds the adapter a different input than the base, so it needs the split form.
    """
    if dropout_p > 0.0 or weight.dtype != lora_dtype:
        return False
    out_f, in_f = weight.shape
    return n_rows * (out_f + 2 * in_f) > 2 * out_f * in_f


def _merged_weight(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    # B = 0 (a fresh adapter) gives W + 0 exactly, so a fresh wrap stays bit-identical; keeping
    # W's memory layout (GPT-2's Conv1D passes W as a transposed view) keeps the BLAS call too.
    if not weight.is_contiguous() and weight.t().is_contiguous():
        return torch.addmm(weight.t(), lora_a.t(), lora_b.t(), alpha=scaling).t()
    return torch.addmm(weight, lora_b, lora_a, alpha=scaling)


class _LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, base_out, weight, bias, lora_a, lora_b, scaling, dropout_p, amp_dtype):
        # Autocast is resolved once, by the caller: inside, every matmul gets explicit dtypes
        # (autocast would otherwise cast behind our back and leave backward with mixed dtypes).
        with torch.autocast(x.device.type, enabled=False):
            out = _forward(
                ctx, x, base_out, weight, bias, lora_a, lora_b, scaling, dropout_p, amp_dtype
            )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            grads = _backward(ctx, grad_out)
        return (*grads, None, None, None)


def _forward(ctx, x, base_out, weight, bias, lora_a, lora_b, scaling, dropout_p, amp_dtype):
    in_features = x.shape[-1]
    x2 = x.reshape(-1, in_features)
    # Under autocast every matmul runs in its dtype, as autocast runs F.linear; the adapter
    # parameters stay float32 masters and their gradients are cast back by autograd.
    lora_dtype = lora_a.dtype if amp_dtype is None else amp_dtype
    lora_a, lora_b = lora_a.to(lora_dtype), lora_b.to(lora_dtype)
    x_lora = None
    keep, packed = None, False
    if dropout_p > 0.0:
        # nn.Dropout's draw, kept at one bit per element where the kernel runs; one temporary
        # for x * mask, and the 1/(1-p) rescale goes on the small (N, r) result.
        keep, packed = keep_mask(x2, dropout_p)
        hidden = torch.mm(apply_keep(x2, keep, packed).to(lora_dtype), lora_a.t()).mul_(
            1.0 / (1.0 - dropout_p)
        )
    else:
        x_lora = x2.to(lora_dtype)
        hidden = torch.mm(x_lora, lora_a.t())
    merged = False
    if base_out is None:
        w = _base_weight(weight, amp_dtype)
        merged = _use_merged_weight(x2.shape[0], w, lora_dtype, dropout_p)
        if merged:
            w = _merged_weight(w, lora_a, lora_b, scaling)
        x_base = x_lora if x_lora is not None and w.dtype == lora_dtype else x2.to(w.dtype)
        if bias is not None:
            out = torch.addmm(bias.to(w.dtype), x_base, w.t())
        else:
            out = torch.mm(x_base, w.t())
    else:
        out = base_out.reshape(-1, base_out.shape[-1]).clone()
    del x_lora
    if merged:
        pass  # the adapter is already inside w
    elif out.dtype == lora_dtype:
        out.addmm_(hidden, lora_b.t(), alpha=scaling)
    else:
        out.add_(torch.mm(hidden, lora_b.t()).mul_(scaling).to(out.dtype))
    ctx.merged = merged
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p
    ctx.amp_dtype = amp_dtype
    ctx.weight_fn = weight if callable(weight) else None
    ctx.has_base_out = base_out is not None
    ctx.x_dtype = x.dtype
    saved_w = weight if isinstance(weight, torch.Tensor) else None
    ctx.packed = packed
    ctx.save_for_backward(x2, hidden, keep, lora_a, lora_b, saved_w)
    ctx.bias_grad = bias is not None and bias.requires_grad
    out = out.view(*x.shape[:-1], out.shape[-1])
    if base_out is not None or amp_dtype is not None:
        return out  # autocast answers in its dtype, as F.linear under autocast does
    # A quantized base computes in its compute dtype but answers in the input's (as bnb does).
    return out.to(x.dtype)


def _base_weight(weight: WeightSource, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """The dense base weight, in the autocast dtype when autocast is on."""
    if not callable(weight):
        return weight if amp_dtype is None else weight.to(amp_dtype)
    if amp_dtype is None:
        return weight()
    # A quantized base dequantizes straight into the autocast dtype: the same values as
    # dequantizing to float32 and casting (one rounding either way), without the float32 copy.
    w = weight(amp_dtype)
    return w.to(amp_dtype)


def _backward(ctx, grad_out):
    x2, hidden, keep, lora_a, lora_b, saved_w = ctx.saved_tensors
    s, p = ctx.scaling, ctx.dropout_p
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    g_lora = g2.to(lora_a.dtype)
    need_x, need_base, _, need_bias, need_a, need_b = ctx.needs_input_grad[:6]

    grad_x = grad_base = grad_bias = grad_a = grad_b = None
    w = None
    if need_x and not ctx.has_base_out:
        w = _base_weight(ctx.weight_fn if ctx.weight_fn is not None else saved_w, ctx.amp_dtype)
        if ctx.merged:
            w = _merged_weight(w, lora_a, lora_b, s)
    if w is not None and w.dtype == lora_b.dtype:
        # One pass over the large output gradient gives both g @ W and g @ B.
        in_features = w.shape[1]
        g_wb = torch.mm(g_lora, torch.cat([w, lora_b], dim=1))
        grad_x = g_wb[:, :in_features]
        g_hidden = g_wb[:, in_features:].mul_(s)
    else:
        g_hidden = torch.mm(g_lora, lora_b).mul_(s)
        if w is not None:
            grad_x = torch.mm(g2.to(w.dtype), w).to(lora_a.dtype)
    if need_b:
        # (h^T g)^T: MKL is several times faster with the long dimension inside.
        grad_b = torch.mm(hidden.t(), g_lora).t().mul_(s)
    if need_a:
        if keep is None:
            grad_a = torch.mm(g_hidden.t(), x2.to(lora_a.dtype))
        else:
            grad_a = torch.mm(g_hidden.t(), apply_keep(x2, keep, ctx.packed).to(lora_a.dtype))
            grad_a.mul_(1.0 / (1.0 - p))
    if need_x and ctx.merged:
        # g @ (W + sBA) already holds the adapter's input gradient
        grad_x = grad_x.to(ctx.x_dtype).reshape(*grad_out.shape[:-1], x2.shape[-1])
    elif need_x:
        lora_gx = torch.mm(g_hidden, lora_a)
        if keep is not None:
            apply_keep(lora_gx, keep, ctx.packed, inplace=True).mul_(1.0 / (1.0 - p))
        grad_x = lora_gx if grad_x is None else grad_x.add_(lora_gx)
        grad_x = grad_x.to(ctx.x_dtype).reshape(*grad_out.shape[:-1], x2.shape[-1])
    if need_base:
        grad_base = grad_out
    if need_bias:
        grad_bias = g2.sum(0)
    return grad_x, grad_base, None, grad_bias, grad_a, grad_b


def lora_linear(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    weight: WeightSource = None,
    bias: torch.Tensor | None = None,
    base_out: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``x W^T + b + scaling * B A drop(x)`` (or ``base_out + scaling * B A drop(x)``).

    Args:
        x: input of shape ``(..., in_features)``.
        lora_a: ``(r, in_features)``; lora_b: ``(out_features, r)``.
        scaling: the adapter scale (``alpha / r``).
        weight: the frozen base weight ``(out, in)``, or a callable returning it (re-called in
            backward; under autocast it is called with the autocast dtype and should answer in
            it), or ``None`` when ``base_out`` is given. It never gets a gradient.
        bias: base bias (gets a gradient if it requires one).
        base_out: a precomputed base output to add the adapter term to.
        dropout_p: dropout on the adapter input (pass 0 in eval mode).
    """
    if (weight is None) == (base_out is None):
        raise ValueError("lora_linear needs exactly one of `weight` and `base_out`")
    if not x.is_floating_point():
        raise TypeError(
            f"lora_linear expects a floating-point input (as nn.Linear does), got {x.dtype}"
        )
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        raise ValueError("lora_linear treats the base weight as frozen, but it requires grad")
    amp_dtype = autocast_dtype(x.device.type)
    return _LoraLinearFunction.apply(
        x, base_out, weight, bias, lora_a, lora_b, float(scaling), float(dropout_p), amp_dtype
    )
