"""LoRA+ (training.loraplus_lr_ratio): the optimizer's groups equal PEFT's create_loraplus_optimizer."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import loraq
from conftest import ReferenceLibrary, needs, tiny_gpt2, tiny_llama
from loraq.train.config import ConfigError, describe_keys, from_dict
from loraq.train.optim import LORAPLUS_LR_EMBEDDING, make_optimizer, make_scheduler
from loraq.train.schema import TrainingConfig

peft = ReferenceLibrary("peft")

LR, RATIO, DECAY = 1e-3, 16.0, 0.05

#: (model, loraq LoraConfig keywords, PEFT LoraConfig keywords): every kind of group is filled
#: (A, embedding, B, 1-D with decay: DoRA magnitudes and RMSNorm weights, 1-D without decay:
#: biases and LayerNorms).
CASES = {
    "gpt2-embedding-bias-layernorm": (
        tiny_gpt2,
        {"targets": ["c_attn", "c_fc", "wte"], "bias": "lora_only", "modules_to_save": ["ln_f"]},
        {
            "target_modules": ["c_attn", "c_fc", "wte"],
            "bias": "lora_only",
            "modules_to_save": ["ln_f"],
            "fan_in_fan_out": True,
        },
    ),
    "llama-dora-rmsnorm": (
        tiny_llama,
        {"targets": ["q_proj", "v_proj"], "use_dora": True, "modules_to_save": ["model.norm"]},
        {
            "target_modules": ["q_proj", "v_proj"],
            "use_dora": True,
            "modules_to_save": ["model.norm"],
        },
    ),
}
#: The (lr, weight decay) of the non-empty groups each case must give.
FILLED = {
    "gpt2-embedding-bias-layernorm": {
        (LR, DECAY),
        (LORAPLUS_LR_EMBEDDING, DECAY),
        (LR * RATIO, DECAY),
        (LR * RATIO, 0.0),
    },
    "llama-dora-rmsnorm": {(LR, DECAY), (LR * RATIO, DECAY)},
}


def _named_groups(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[tuple]:
    """Each non-empty group as (sorted parameter names in loraq's naming, lr, weight decay)."""
    names = {}
    for name, param in model.named_parameters():
        name = name.removeprefix("base_model.model.")
        names[id(param)] = name.replace(
            "lora_magnitude_vector.default.weight", "lora_magnitude_vector.default"
        )
    return [
        (sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"])
        for g in optimizer.param_groups
        if g["params"]
    ]


@needs("peft")
@pytest.mark.parametrize("case", list(CASES))
def test_groups_equal_peft_create_loraplus_optimizer(case: str) -> None:
    from peft.optimizers import create_loraplus_optimizer

    factory, ours_kw, peft_kw = CASES[case]
    base = factory()
    ours = loraq.apply(copy.deepcopy(base), loraq.LoraConfig(r=4, alpha=8, **ours_kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **peft_kw)
        )
    reference = create_loraplus_optimizer(
        theirs,
        torch.optim.AdamW,
        lr=LR,
        loraplus_lr_ratio=RATIO,
        loraplus_weight_decay=DECAY,
        loraplus_lr_embedding=LORAPLUS_LR_EMBEDDING,
    )
    optimizer = make_optimizer(
        ours, TrainingConfig(lr=LR, weight_decay=DECAY, loraplus_lr_ratio=RATIO)
    )
    groups, expected = _named_groups(optimizer, ours), _named_groups(reference, theirs)
    assert groups == expected
    # Every trainable tensor is in exactly one group, and the case fills the groups it claims.
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert sorted(n for g, _, _ in groups for n in g) == trainable
    filled = {(lr, wd) for _, lr, wd in groups}
    assert filled == FILLED[case]


def test_b_trains_at_ratio_times_lr_through_the_schedule() -> None:
    model = loraq.apply(tiny_llama(), loraq.LoraConfig(r=4, targets=["q_proj"]))
    t = TrainingConfig(lr=LR, loraplus_lr_ratio=RATIO, warmup_steps=2, schedule="constant")
    optimizer = make_optimizer(model, t)
    scheduler = make_scheduler(optimizer, t, total_steps=10)
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    group_a, group_b = (
        by_param[id(layer.lora_A["default"].weight)],
        by_param[id(layer.lora_B["default"].weight)],
    )
    assert group_a["lr"] == pytest.approx(LR / 2)  # warm-up step 1 of 2
    assert group_b["lr"] == pytest.approx(LR * RATIO / 2)
    optimizer.step()
    scheduler.step()
    assert group_b["lr"] / group_a["lr"] == pytest.approx(RATIO)


def test_without_ratio_the_plain_groups_stay() -> None:
    model = loraq.apply(tiny_llama(), loraq.LoraConfig(r=4, targets=["q_proj"]))
    optimizer = make_optimizer(model, TrainingConfig(lr=LR, weight_decay=DECAY))
    assert [g["lr"] for g in optimizer.param_groups] == [LR]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [DECAY]


def _raw(**training) -> dict:
    return {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "training": training}


def test_config_key_is_declared_once_with_its_default() -> None:
    assert TrainingConfig().loraplus_lr_ratio is None
    assert from_dict(_raw(loraplus_lr_ratio=16)).training.loraplus_lr_ratio == 16.0
    assert "loraplus_lr_ratio=None" in describe_keys()


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"loraplus_lr_ratio": 0}, "training.loraplus_lr_ratio must be > 0 or null, got 0"),
        ({"loraplus_lr_ratio": -2.0}, "training.loraplus_lr_ratio must be > 0"),
        ({"loraplus_lr_ratio": "x"}, "training.loraplus_lr_ratio"),
        (
            {"loraplus_lr_ratio": 16, "method": "full"},
            "applies to training.method 'lora', 'dpo' or 'orpo' only",
        ),
    ],
)
def test_bad_ratio_names_the_key(training: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict(_raw(**training))
    assert message in str(caught.value)
