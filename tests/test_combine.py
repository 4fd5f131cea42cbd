"""loraq.combine and `loraq combine`: equal to PEFT's add_weighted_adapter, all or nothing."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import loraq
from conftest import ReferenceLibrary, needs, tiny_gpt2, tiny_llama
from loraq import cli
from loraq.io.peft_format import read_adapter
from loraq.model import combine as combine_module
from loraq.model.combine import COMBINE_METHODS, DENSITY_METHODS
from tiny_lm import save_tiny_folder

peft = ReferenceLibrary("peft")

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
WEIGHTS = {"a": 0.7, "b": -0.3}
SEED = 7


def _randomize_all(model: nn.Module, std: float = 0.1) -> None:
    """Perturb every adapter tensor (a fresh B is zero and would prove nothing)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * std)


def _density(method: str) -> dict:
    return {"density": 0.5} if method in DENSITY_METHODS else {}


def _pair(
    base: nn.Module,
    targets: list[str],
    ranks: tuple[int, int] = (4, 4),
    alphas: tuple[float, float] = (8, 4),
    fan_in_fan_out: bool = False,
    **ours_options,
) -> tuple[nn.Module, nn.Module]:
    """Adapters ``a`` and ``b`` with the same random values in loraq and in PEFT."""
    ours = copy.deepcopy(base)
    for name, r, alpha in zip("ab", ranks, alphas):
        config = loraq.LoraConfig(r=r, alpha=alpha, targets=targets, **ours_options)
        loraq.apply(ours, config, name)
    _randomize_all(ours)
    kw = {"target_modules": targets, "fan_in_fan_out": fan_in_fan_out}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=ranks[0], lora_alpha=alphas[0], **kw), "a"
        )
        theirs.add_adapter("b", peft.LoraConfig(r=ranks[1], lora_alpha=alphas[1], **kw))
    state = theirs.state_dict()
    with torch.no_grad():
        for name, tensor in ours.state_dict().items():
            if "lora_" in name:
                state["base_model.model." + name].copy_(tensor)
    return ours, theirs


def _tensors_of(model: nn.Module, adapter: str, prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        k.removeprefix(prefix): v
        for k, v in model.state_dict().items()
        if f".{adapter}." in k or k.endswith(f".{adapter}")
    }


def _assert_same_as_peft(ours, theirs, method: str, **options) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(SEED)
        theirs.add_weighted_adapter(  # density and svd_rank have the same names there
            list(WEIGHTS), list(WEIGHTS.values()), "ab", combination_type=method, **options
        )
    torch.manual_seed(SEED)
    loraq.combine(ours, WEIGHTS, method, name="ab", **options)
    mine = _tensors_of(ours, "ab")
    reference = _tensors_of(theirs, "ab", "base_model.model.")
    assert mine and set(mine) == set(reference)
    for key, tensor in mine.items():
        # The same operations in the same order: equal up to summation order in BLAS.
        torch.testing.assert_close(tensor, reference[key], rtol=1e-5, atol=1e-6, msg=key)
    assert loraq.config_of(ours, "ab").r == theirs.peft_config["ab"].r


# ------------------------------------------------------------------------------ PEFT parity
@needs("peft")
@pytest.mark.parametrize("method", COMBINE_METHODS)
def test_equals_peft_add_weighted_adapter(method: str) -> None:
    ours, theirs = _pair(tiny_llama(), LLAMA_TARGETS)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    _assert_same_as_peft(ours, theirs, method, **_density(method))
    assert loraq.active_adapter(ours) == "b"  # as PEFT: the new adapter starts inactive
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == trainable


@needs("peft")
@pytest.mark.parametrize(
    ("method", "options"),
    [("cat", {}), ("svd", {}), ("svd", {"svd_rank": 6}), ("dare_ties_svd", {"density": 0.7})],
)
def test_different_ranks_equal_peft(method: str, options: dict) -> None:
    ours, theirs = _pair(tiny_llama(), LLAMA_TARGETS, ranks=(4, 8))
    _assert_same_as_peft(ours, theirs, method, **options)
    expected = {"cat": 12, "svd": options.get("svd_rank", 8), "dare_ties_svd": 8}[method]
    assert loraq.config_of(ours, "ab").r == expected


@needs("peft")
@pytest.mark.parametrize("method", ["cat", "linear", "svd", "ties"])
@pytest.mark.parametrize("model_key", ["gpt2", "llama-embedding"])
def test_conv1d_and_embedding_layers_equal_peft(method: str, model_key: str) -> None:
    if model_key == "gpt2":
        ours, theirs = _pair(tiny_gpt2(), ["c_attn", "c_fc"], fan_in_fan_out=True)
    else:
        ours, theirs = _pair(tiny_llama(), ["embed_tokens", "q_proj"])
    _assert_same_as_peft(ours, theirs, method, **_density(method))


@needs("peft")
@pytest.mark.parametrize("method", ["dare_ties", "svd"])
def test_nf4_base_equals_peft(method: str) -> None:
    """The combination reads only the adapters: over loraq's NF4 base it equals PEFT's over
    the float base (and DARE's masks still follow the same random stream)."""
    ours, theirs = _pair(tiny_llama(), LLAMA_TARGETS, quant="nf4")
    assert any(layer.is_quantized for _, layer in combine_module.lora_layers(ours))
    _assert_same_as_peft(ours, theirs, method, **_density(method))


@needs("peft")
def test_dare_masks_follow_the_seed() -> None:
    ours, _ = _pair(tiny_llama(), LLAMA_TARGETS)
    for name, seed in (("s1", 1), ("s1_again", 1), ("s2", 2)):
        torch.manual_seed(seed)
        loraq.combine(ours, WEIGHTS, "dare_linear", density=0.5, name=name)
    layer = ours.get_submodule("model.layers.0.self_attn.q_proj")
    assert torch.equal(layer.lora_A["s1"].weight, layer.lora_A["s1_again"].weight)
    assert not torch.equal(layer.lora_A["s1"].weight, layer.lora_A["s2"].weight)


# ------------------------------------------------------------------------------ semantics
def test_cat_is_the_exact_weighted_sum_even_with_rslora() -> None:
    """``cat`` adds ``w_i * delta_i`` exactly. PEFT would also scale the result by sqrt(r)
    for rsLoRA sources; loraq's combined adapter has scaling 1."""
    model = tiny_llama()
    for name, r in (("a", 4), ("b", 2)):
        loraq.apply(
            model, loraq.LoraConfig(r=r, alpha=3, targets=LLAMA_TARGETS, use_rslora=True), name
        )
    _randomize_all(model)
    loraq.combine(model, WEIGHTS, "cat", name="ab")
    assert loraq.config_of(model, "ab").scaling == 1.0
    for _, layer in combine_module.lora_layers(model):
        expected = 0.7 * layer.delta_matrix("a") - 0.3 * layer.delta_matrix("b")
        torch.testing.assert_close(layer.delta_matrix("ab"), expected, rtol=1e-5, atol=1e-6)


@needs("peft")
def test_combined_adapter_saves_in_peft_layout(tmp_path: Path) -> None:
    base = tiny_llama()
    model = copy.deepcopy(base)
    for name in "ab":
        loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, targets=LLAMA_TARGETS), name)
    _randomize_all(model)
    loraq.combine(model, WEIGHTS, "ties", density=0.6, name="ab")
    loraq.set_adapter(model, "ab")
    tokens = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        ours = model(tokens).logits
        plain = base(tokens).logits
    assert (ours - plain).abs().max() > 1e-3
    loraq.save_adapter(model, tmp_path, adapter_name="ab")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    reloaded = loraq.load_adapter(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reloaded(tokens).logits, ours, rtol=1e-5, atol=1e-5)


def test_combined_adapter_exports_to_gguf(tmp_path: Path) -> None:
    base = tiny_llama()
    model = copy.deepcopy(base)
    for name, r in (("a", 4), ("b", 2)):
        loraq.apply(model, loraq.LoraConfig(r=r, alpha=8, targets=LLAMA_TARGETS), name)
    _randomize_all(model)
    loraq.combine(model, WEIGHTS, "svd", name="ab")
    loraq.set_adapter(model, "ab")
    path = loraq.export_gguf(model, tmp_path / "ab.gguf")
    loraq.load_gguf_adapter(base, path)
    tokens = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(base(tokens).logits, model(tokens).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ bad input
def _two_adapters(**b_options) -> nn.Module:
    model = tiny_llama()
    loraq.apply(model, loraq.LoraConfig(r=4, targets=LLAMA_TARGETS), "a")
    options = {"r": 4, "targets": LLAMA_TARGETS, **b_options}
    loraq.apply(model, loraq.LoraConfig(**options), "b")
    return model


def _different_base(model: nn.Module) -> None:
    model.loraq_configs["a"].extra["base_model_name_or_path"] = "models/one"
    model.loraq_configs["b"].extra["base_model_name_or_path"] = "models/two"


@pytest.mark.parametrize(
    ("b_options", "prepare", "weights", "kwargs", "message"),
    [
        ({"targets": ["q_proj"]}, None, WEIGHTS, {}, "adapt different modules"),
        ({}, _different_base, WEIGHTS, {}, "different bases ('models/one' and 'models/two')"),
        ({}, None, {"a": 0.5, "c": 0.5}, {}, "unknown adapter 'c'"),
        ({}, None, {"a": "x", "b": 1.0}, {}, "weight of adapter 'a' must be a finite number"),
        ({}, None, {"a": float("nan"), "b": 1.0}, {}, "must be a finite number"),
        ({}, None, {}, {}, "non-empty {adapter name: weight} mapping"),
        ({}, None, [0.7, 0.3], {}, "mapping"),
        ({}, None, WEIGHTS, {"method": "average"}, "unknown method 'average'"),
        ({}, None, WEIGHTS, {"method": "ties"}, "needs density in (0, 1]"),
        ({}, None, WEIGHTS, {"method": "ties", "density": 0.0}, "needs density in (0, 1]"),
        ({}, None, WEIGHTS, {"method": "dare_ties", "density": 1.5}, "needs density"),
        ({}, None, WEIGHTS, {"method": "linear", "density": 0.5}, "density applies only"),
        ({"r": 8}, None, WEIGHTS, {"method": "ties", "density": 0.5}, "equal rank"),
        ({"use_dora": True}, None, WEIGHTS, {}, "adapter 'b' uses DoRA"),
        ({}, None, WEIGHTS, {"name": "a"}, "already has an adapter named 'a'"),
        ({}, None, WEIGHTS, {"method": "svd", "svd_rank": 40}, "exceeds min(out, in)"),
        ({}, None, WEIGHTS, {"majority_sign": "most"}, "majority_sign"),
    ],
)
def test_bad_input_names_the_problem_and_changes_nothing(
    b_options, prepare, weights, kwargs, message
) -> None:
    model = _two_adapters(**b_options)
    if prepare is not None:
        prepare(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError) as caught:
        loraq.combine(model, weights, **kwargs)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert loraq.adapter_names(model) == ["a", "b"]
    assert [type(m) for m in model.modules()] == modules_before
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert loraq.active_adapter(model) == "b"


def test_failure_half_way_leaves_model_unchanged(monkeypatch) -> None:
    model = _two_adapters()
    keys = set(model.state_dict())
    written = []
    real = combine_module._write_combination

    def fail_on_second_layer(layer, name, plan):
        if written:
            raise RuntimeError("simulated failure")
        written.append(layer)
        real(layer, name, plan)

    monkeypatch.setattr(combine_module, "_write_combination", fail_on_second_layer)
    with pytest.raises(RuntimeError, match="simulated"):
        loraq.combine(model, WEIGHTS, "cat", name="ab")
    assert written
    assert loraq.adapter_names(model) == ["a", "b"]
    assert set(model.state_dict()) == keys
    assert not any("ab" in layer.r for _, layer in combine_module.lora_layers(model))
    assert loraq.active_adapter(model) == "b"


# ------------------------------------------------------------------------------ command line
@pytest.fixture
def adapter_folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A saved tiny model and two adapters trained on it: (base folder, adapter a, adapter b)."""
    from transformers import AutoModelForCausalLM

    base = save_tiny_folder(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    for name in "ab":
        loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, targets=LLAMA_TARGETS), name)
    _randomize_all(model)
    for name in "ab":
        loraq.save_adapter(model, tmp_path / name, adapter_name=name)
    return base, tmp_path / "a", tmp_path / "b"


def test_cli_combine_equals_the_library(adapter_folders, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    base, folder_a, folder_b = adapter_folders
    out = tmp_path / "ab"
    args = ["combine", "--adapter", f"a={folder_a}", "--adapter", f"b={folder_b}"]
    args += ["--weights", "0.7,-0.3", "--method", "dare_ties", "--density", "0.5"]
    assert cli.main([*args, "--seed", "3", "--out", str(out)]) == 0
    assert f"written to {out}" in capsys.readouterr().out
    saved_config, saved, _ = read_adapter(out)

    model = AutoModelForCausalLM.from_pretrained(base)
    loraq.load_adapter(model, folder_a, "a")
    loraq.load_adapter(model, folder_b, "b")
    torch.manual_seed(3)
    loraq.combine(model, WEIGHTS, "dare_ties", density=0.5, name="ab")
    expected = loraq.adapter_state_dict(model, "ab")
    assert len(saved) == len(expected) > 0
    for key, tensor in expected.items():
        disk_key = "base_model.model." + key.replace(".ab.", ".")
        torch.testing.assert_close(saved[disk_key], tensor, rtol=0, atol=0, msg=key)
    assert saved_config.r == 4
    assert saved_config.extra["base_model_name_or_path"] == str(base)


def _set_base(folder: Path, base: str) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = base
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("extra", "prepare", "message"),
    [
        (["--weights", "0.7"], None, "--weights has 1 value(s) for 2 adapter(s)"),
        (["--weights", "0.7,x"], None, "weight of adapter 'b' is not a number"),
        (["--weights", "1,1", "--method", "ties"], None, "needs density in (0, 1]"),
        (["--weights", "1,1", "--method", "ties", "--density", "2"], None, "needs density"),
        (["--weights", "1,1", "--method", "mean"], None, "invalid choice: 'mean'"),
        (["--weights", "1,1"], "other-base", "'a' and 'b' were trained on different bases"),
        (["--weights", "1,1", "--adapter", "c"], None, "--adapter expects NAME=DIR, got 'c'"),
    ],
)
def test_cli_bad_input_is_one_line(adapter_folders, tmp_path, capsys, extra, prepare, message):
    _, folder_a, folder_b = adapter_folders
    if prepare == "other-base":
        _set_base(folder_b, str(tmp_path / "elsewhere"))
    out = tmp_path / "ab"
    args = ["combine", "--adapter", f"a={folder_a}", "--adapter", f"b={folder_b}"]
    assert cli.main([*args, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loraq combine: error:") and err.count("\n") == 1, err
    assert message in err
    assert not out.exists()
