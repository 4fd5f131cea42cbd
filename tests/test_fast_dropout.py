"""FastDropout: nn.Dropout's values and gradients under the same seed, with a 1-byte saved mask."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_bert_cls
from loraq.layers.dropout import FastDropout, plain_dropout, use_fast_dropout
from loraq.native import bernoulli


def _saved_bytes(fn, x: torch.Tensor) -> int:
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(sizes.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_values_and_gradients_equal_nn_dropout(dtype):
    x = torch.randn(32, 64, 96, dtype=dtype, requires_grad=True)
    results = []
    for module in (nn.Dropout(0.1), FastDropout(0.1)):
        torch.manual_seed(4)
        out = module(x)
        (grad,) = torch.autograd.grad(out.float().sin().sum(), x)
        results.append((out, grad, torch.get_rng_state()))
    (ref, ref_grad, ref_state), (got, got_grad, got_state) = results
    assert torch.equal(got, ref) and torch.equal(got_grad, ref_grad)
    assert torch.equal(got_state, ref_state)


def test_double_backward_matches():
    x = torch.randn(64, 64, dtype=torch.float64, requires_grad=True)
    grads = []
    for fn in (lambda t: F.dropout(t, 0.2, training=True), lambda t: bernoulli.dropout(t, 0.2)):
        torch.manual_seed(8)
        (g,) = torch.autograd.grad(fn(x).pow(3).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), x)
        grads.append(gg)
    assert torch.equal(grads[0], grads[1])


def test_saves_one_bit_per_element_for_backward():
    if not (bernoulli.exact_kernel_available() and bernoulli.packing_available()):
        pytest.skip("PyTorch's own draw is used here")
    x = torch.randn(128, 385, requires_grad=True)
    ours = _saved_bytes(lambda t: bernoulli.dropout(t, 0.1), x)
    theirs = _saved_bytes(lambda t: F.dropout(t, 0.1, training=True), x)
    assert ours == -(-x.numel() // 8) and theirs == 4 * x.numel()


def test_eval_inplace_and_edge_probabilities_are_nn_dropouts():
    x = torch.randn(64, 64)
    assert torch.equal(FastDropout(0.5).eval()(x), x)
    assert torch.equal(FastDropout(1.0)(x), torch.zeros_like(x))
    assert torch.equal(FastDropout(0.0)(x), x)
    torch.manual_seed(1)
    ref = nn.Dropout(0.3, inplace=True)(x.clone())
    torch.manual_seed(1)
    got = x.clone()
    FastDropout(0.3, inplace=True)(got)
    assert torch.equal(got, ref)


def test_use_fast_dropout_keeps_the_model_and_its_training_outputs():
    model = tiny_bert_cls()
    plain = copy.deepcopy(model)
    hooked = next(m for m in model.modules() if type(m) is nn.Dropout)
    calls: list[int] = []
    hooked.register_forward_hook(lambda *_: calls.append(1))
    count = use_fast_dropout(model)
    assert count == sum(type(m) is nn.Dropout for m in plain.modules()) > 0
    assert type(hooked) is FastDropout and isinstance(hooked, nn.Dropout)
    assert use_fast_dropout(model) == 0  # already switched
    tokens = torch.randint(0, 64, (8, 32))
    losses = []
    for m in (plain, model):
        m.train()
        torch.manual_seed(6)
        loss = m(tokens).logits.square().mean()
        loss.backward()
        losses.append((loss.detach(), [p.grad for p in m.parameters()]))
    assert calls and torch.equal(losses[0][0], losses[1][0])
    assert all(torch.equal(a, b) for a, b in zip(losses[0][1], losses[1][1], strict=True))


def test_loraq_train_prepares_models_with_fast_dropout(tmp_path, bert_dir):
    from conftest import sentiment_config
    from loraq.train.config import load_config
    from loraq.train.modeling import load_model, prepare_model

    cfg = load_config(sentiment_config(tmp_path, bert_dir, {"r": 4}, num_threads=1))
    model, new_modules = load_model(cfg.model.path, cfg.model.task, ["neg", "pos"])
    before = sum(type(m) is nn.Dropout for m in model.modules())
    model = prepare_model(model, cfg, new_modules)
    assert before > 0 and sum(type(m) is FastDropout for m in model.modules()) == before


def test_apply_switches_the_models_dropout_and_unload_switches_it_back():
    import loraq

    model = tiny_bert_cls()
    own = [m for m in model.modules() if type(m) is nn.Dropout]
    loraq.apply(model, loraq.LoraConfig(r=2, targets=["query"], dropout=0.1))
    assert own and all(type(m) is FastDropout for m in own)
    loraq.unload(model)
    assert all(type(m) is nn.Dropout for m in own)
    assert not any(type(m).__module__.startswith("loraq") for m in model.modules())


@pytest.mark.parametrize("fn", [use_fast_dropout, plain_dropout])
def test_switching_something_that_is_not_a_module_names_it(fn):
    with pytest.raises(TypeError, match=rf"{fn.__name__}\(\) needs a torch.nn.Module, got dict"):
        fn({"dropout": nn.Dropout(0.1)})
