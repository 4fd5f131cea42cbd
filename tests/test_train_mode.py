"""Adapters added to a model follow the train/eval mode of the modules they wrap.

An inference model (``model.eval()``) that receives an adapter, by ``apply`` or
``load_adapter``, must not draw adapter dropout; ``model.train()`` turns dropout on as usual.
"""

import torch
from torch import nn

import loraq


def _model(training: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4), nn.Embedding(10, 4))
    return model.train(training)


def _config(**kw) -> loraq.LoraConfig:
    return loraq.LoraConfig(r=4, targets=["0", "2"], dropout=0.5, init="gaussian", **kw)


def _outputs_vary(model: nn.Module) -> bool:
    with torch.no_grad():  # B starts at zero, which would hide the adapter's dropout
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    x = torch.randn(8, 16)
    first = model[:3](x)
    return any(not torch.equal(first, model[:3](x)) for _ in range(3))


def test_apply_on_an_eval_model_draws_no_dropout_until_train():
    model = loraq.apply(_model(training=False), _config(modules_to_save=["3"]))
    assert not any(m.training for m in model.modules())
    assert not _outputs_vary(model)
    model.train()
    assert _outputs_vary(model)


def test_apply_on_a_training_model_keeps_training_mode():
    model = loraq.apply(_model(training=True), _config())
    assert all(m.training for m in model.modules())
    assert _outputs_vary(model)


def test_second_adapter_on_an_eval_model_stays_in_eval_mode():
    model = loraq.apply(_model(training=False), _config())
    loraq.apply(model, _config(), adapter_name="second")
    loraq.set_adapter(model, "second")
    assert not any(m.training for m in model.modules())
    assert not _outputs_vary(model)


def test_load_adapter_onto_an_eval_model_is_deterministic(tmp_path):
    trained = loraq.apply(_model(training=True), _config())
    loraq.save_adapter(trained, tmp_path / "adapter")
    model = loraq.load_adapter(_model(training=False), tmp_path / "adapter")
    assert not any(m.training for m in model.modules())
    assert not _outputs_vary(model)
