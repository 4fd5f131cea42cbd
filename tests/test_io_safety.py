"""Bad files fail with messages that say what is wrong and where; writes never leave half a file."""

from __future__ import annotations

import copy
import errno
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraq
from conftest import tiny_llama
from loraq.io import FormatError, load_adapter, save_adapter
from loraq.io import safe as safe_mod
from loraq.io.safe import (
    atomic_write_text,
    parse_safetensors,
    read_bytes,
    read_safetensors,
    remove_folder,
    remove_orphans,
    staged_folder,
)

PREFIX = "base_model.model."


def _saved(tmp_path: Path) -> Path:
    model = loraq.apply(tiny_llama(), loraq.LoraConfig(r=4, alpha=8, targets=["q_proj"]))
    return save_adapter(model, tmp_path / "adapter")


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


class _Boom:
    """Unpickling this would create a marker file: proof that a file was (not) unpickled."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------------- pickles
def test_pickle_adapter_is_refused_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "UNPICKLED"
    _Boom.marker = str(marker)
    folder = tmp_path / "peft-bin"
    folder.mkdir()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Boom()))
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    )
    with pytest.raises(FormatError, match=r"(?s)adapter_model\.bin is a pickle file.*save_file"):
        load_adapter(tiny_llama(), folder)
    with pytest.raises(FormatError, match="pickle file"):
        load_adapter(tiny_llama(), folder / "adapter_model.bin")
    with pytest.raises(FormatError, match="pickle file"):
        read_safetensors(folder / "adapter_model.bin")
    assert not marker.exists()


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"my_field": 1, "other": 2}, r"unknown field\(s\) \['my_field', 'other'\]"),
        ({"r": "8"}, r"field 'r' must be a positive integer, got '8' \(str\)"),
        ({"r": True}, r"field 'r' must be a positive integer"),
        ({"r": 0}, r"field 'r': r=0 is invalid"),
        ({"lora_alpha": [16]}, r"field 'lora_alpha' must be a number"),
        ({"lora_dropout": 1.5}, r"field 'lora_dropout': lora_dropout=1.5 is invalid"),
        ({"use_dora": "yes"}, r"field 'use_dora' must be true or false"),
        ({"bias": "some"}, r"field 'bias': bias='some' is invalid"),
        ({"target_modules": 3}, r"field 'target_modules' must be a list"),
        ({"target_modules": None}, r"field 'target_modules' is empty"),
        ({"target_modules": "(unclosed"}, r"field 'target_modules': .*regular expression"),
        ({"modules_to_save": "lm_head"}, r"field 'modules_to_save' must be a list"),
        ({"peft_type": "IA3"}, r"field 'peft_type' is 'IA3'; loraq reads LoRA adapters only"),
        ({"rank_pattern": {"q_proj": 2}}, r"field 'rank_pattern' is \{'q_proj': 2\}"),
        ({"alpha_pattern": {"q_proj": 2}}, r"field 'alpha_pattern'"),
        ({"layers_to_transform": [0]}, r"field 'layers_to_transform' is \[0\]"),
        ({"lora_bias": True}, r"field 'lora_bias' is True"),
        ({"use_qalora": True}, r"field 'use_qalora'"),
        ({"init_lora_weights": "olora"}, r"field 'init_lora_weights' is 'olora'"),
        ({"loraq_adapter_bits": "4"}, r"field 'loraq_adapter_bits' must be an integer"),
        ({"loraq_adapter_bits": 12}, r"field 'loraq_adapter_bits': loraq_adapter_bits=12"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, changes: dict, message: str) -> None:
    folder = _saved(tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(FormatError, match=message) as err:
        load_adapter(tiny_llama(), folder)
    assert "adapter_config.json" in str(err.value)


def test_fields_of_a_later_peft_are_read_when_off(tmp_path: Path) -> None:
    # a later PEFT writes every field it has, a new feature's at its default (PEFT 0.22 added
    # astra_config: null): such a file loads as if the field were absent; switched on, the
    # unknown feature is refused by name rather than silently ignored
    model = loraq.apply(tiny_llama(), loraq.LoraConfig(r=4, alpha=8, targets=["q_proj"]))
    folder = save_adapter(model, tmp_path / "a")
    base = tiny_llama()
    want = load_adapter(copy.deepcopy(base), folder)
    _edit_config(folder, future_config=None, future_flag=False, future_map={}, future_list=[])
    got = load_adapter(copy.deepcopy(base), folder)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)
    _edit_config(folder, future_config={"rank": 2})
    with pytest.raises(FormatError, match=r"unknown field\(s\) \['future_config'\]; .*null"):
        load_adapter(tiny_llama(), folder)


def test_missing_peft_type_and_bad_json(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    data = json.loads((folder / "adapter_config.json").read_text())
    del data["peft_type"]
    (folder / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match="field 'peft_type' is missing"):
        load_adapter(tiny_llama(), folder)
    (folder / "adapter_config.json").write_text('{"r": 4,')
    with pytest.raises(FormatError, match=r"adapter_config\.json is not valid JSON"):
        load_adapter(tiny_llama(), folder)
    (folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(FormatError, match="must hold a JSON object"):
        load_adapter(tiny_llama(), folder)


def test_minimal_peft_config_loads(tmp_path: Path) -> None:
    model = loraq.apply(
        tiny_llama(),
        loraq.LoraConfig(r=4, alpha=8, targets=["q_proj"], modules_to_save=["lm_head"]),
    )
    folder = save_adapter(model, tmp_path / "a")
    minimal = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj"],
        "modules_to_save": ["lm_head"],
        "task_type": "CAUSAL_LM",
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(minimal))
    loaded = load_adapter(tiny_llama(), folder)
    assert loraq.config_of(loaded).scaling == 2.0
    assert loraq.config_of(loaded).modules_to_save == ["lm_head"]


def test_default_valued_unsupported_fields_are_accepted(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    _edit_config(
        folder,
        layers_pattern=None,
        rank_pattern={},
        loftq_config={},
        use_bdlora=False,
        fan_in_fan_out=True,
        inference_mode=False,
        peft_version="0.13.0",
        revision="main",
    )
    loaded = load_adapter(tiny_llama(), folder)
    config = loraq.config_of(loaded)
    assert (config.r, config.alpha, config.targets) == (4, 8, ["q_proj"])
    saved = load_file(str(folder / "adapter_model.safetensors"))
    state = loraq.adapter_state_dict(loaded)
    assert len(state) == len(saved) == 4  # lora_A and lora_B of two q_proj layers
    for key, tensor in state.items():
        assert torch.equal(tensor, saved[PREFIX + key.replace(".default", "")]), key


# ---------------------------------------------------------------------------------- tensors
def _rewrite_weights(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_wrong_shape_names_key_and_both_shapes(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    key = PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite_weights(folder, lambda t: t.__setitem__(key, torch.zeros(3, 32)))
    model = tiny_llama()
    with pytest.raises(
        FormatError, match=rf"'{key}' has shape \(3, 32\) but the model expects \(4, 32\)"
    ):
        load_adapter(model, folder)
    # The failed load leaves no adapter behind.
    assert loraq.adapter_names(model) == []


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    gone = PREFIX + "model.layers.1.self_attn.q_proj.lora_B.weight"

    def edit(t: dict) -> None:
        del t[gone]
        t[PREFIX + "model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
        t["not_prefixed.weight"] = torch.zeros(1)

    _rewrite_weights(folder, edit)
    with pytest.raises(FormatError) as err:
        load_adapter(tiny_llama(), folder)
    text = str(err.value)
    assert f"missing keys ['{gone}']" in text
    assert (
        "unexpected keys ['base_model.model.model.layers.0.mlp.up_proj.lora_A.weight', 'not_prefixed.weight']"
        in text
    )


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors_names_the_file(tmp_path: Path, damage: str) -> None:
    folder = _saved(tmp_path)
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x00" * 7 + b"junk", "empty": b""}[damage]
    )
    with pytest.raises(FormatError, match=rf"{path}.*not a readable safetensors file"):
        load_adapter(tiny_llama(), folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors_read_whole_names_the_file(tmp_path: Path, damage: str) -> None:
    path = _saved(tmp_path) / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x00" * 7 + b"junk", "empty": b""}[damage]
    )
    with pytest.raises(FormatError, match=rf"{path}.*not a readable safetensors file"):
        parse_safetensors(read_bytes(path), path)


def test_tensors_read_whole_survive_a_rewrite_of_their_file(tmp_path: Path) -> None:
    """read_bytes then parse_safetensors (what a server's adapter reads use): nothing maps the
    file, so a file rewritten or truncated afterwards changes none of the tensors read before."""
    path = tmp_path / "w.safetensors"
    first = {f"t{i}": torch.full((64, 64), float(i)) for i in range(4)}
    save_file(first, path)
    owned = parse_safetensors(read_bytes(path), path)
    mapped, _ = read_safetensors(path)
    assert owned.keys() == first.keys()
    path.write_bytes(b"")  # truncated in place: a mapping of it would fault when touched
    save_file({k: -v for k, v in first.items()}, path)
    for key, tensor in first.items():
        assert torch.equal(owned[key], tensor)
    del mapped


def test_a_nan_among_many_tensors_is_named(tmp_path: Path) -> None:
    from loraq.io.adapter_check import check_finite

    tensors = {f"t{i}": torch.randn(3, 5) for i in range(40)}
    tensors["codes"] = torch.zeros(4, dtype=torch.uint8)
    tensors["half"] = torch.randn(8, dtype=torch.float16)
    tensors["bf16"] = torch.randn(8, dtype=torch.bfloat16)
    tensors["big"] = torch.zeros(1 << 20)
    check_finite(tensors, "f.safetensors")
    cases = [("t17", float("nan")), ("half", float("-inf")), ("bf16", float("nan"))]
    for key, bad in [*cases, ("bf16", float("inf")), ("big", float("inf"))]:
        poisoned = dict(tensors)
        poisoned[key] = tensors[key].clone()
        poisoned[key].view(-1)[2] = bad
        with pytest.raises(FormatError, match=rf"f\.safetensors: tensor '{key}' holds NaN or Inf"):
            check_finite(poisoned, "f.safetensors")
    # all float32 (an adapter file's usual content): one compiled scan where a compiler exists
    only32 = {f"t{i}": torch.randn(3, 5) for i in range(40)}
    check_finite(only32, "f.safetensors")
    only32["t33"][1, 4] = float("nan")
    with pytest.raises(FormatError, match=r"tensor 't33' holds NaN or Inf"):
        check_finite(only32, "f.safetensors")


def test_missing_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tiny_llama(), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="has no adapter_config.json"):
        load_adapter(tiny_llama(), tmp_path / "empty")
    folder = _saved(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FormatError, match="has no adapter_model.safetensors"):
        load_adapter(tiny_llama(), folder)


# ---------------------------------------------------------------------------------- writes
def test_failed_save_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = loraq.apply(tiny_llama(), loraq.LoraConfig(targets=["q_proj"]))
    folder = save_adapter(model, tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    (folder / "notes.txt").write_text("keep me")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("loraq.io.peft_format.atomic_write_json", broken)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.fill_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, folder)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "notes.txt"} == before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no .tmp- folders left
    monkeypatch.undo()
    save_adapter(model, folder)  # over an existing folder: other files stay
    assert (folder / "notes.txt").read_text() == "keep me"
    assert (folder / "adapter_model.safetensors").read_bytes() != before[
        "adapter_model.safetensors"
    ]


def test_atomic_file_write_keeps_old_content_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def broken(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(safe_mod.os, "replace", broken)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_staged_folder_refuses_a_file_target(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is not a folder"):
        with staged_folder(tmp_path / "file"):
            pass


def test_staged_folder_replace_swaps_the_whole_folder(tmp_path: Path) -> None:
    target = tmp_path / "result"
    with staged_folder(target, replace=True) as staging:
        (staging / "a.txt").write_text("one")
        (staging / "b.txt").write_text("one")
    with staged_folder(target, replace=True) as staging:
        (staging / "a.txt").write_text("two")
    assert sorted(os.listdir(target)) == ["a.txt"]  # b.txt went with the old folder
    assert (target / "a.txt").read_text() == "two"
    with pytest.raises(RuntimeError, match="writer failed"):
        with staged_folder(target, replace=True) as staging:
            (staging / "a.txt").write_text("three")
            raise RuntimeError("writer failed")
    assert (target / "a.txt").read_text() == "two"  # untouched
    assert sorted(os.listdir(tmp_path)) == ["result"]  # no .tmp- or .old- folders left


def test_staged_folder_names_the_target_when_the_disk_is_full(tmp_path: Path) -> None:
    target = tmp_path / "step-000002"
    with pytest.raises(OSError, match=r"no space left on device") as info:
        with staged_folder(target, replace=True):
            raise RuntimeError('IoError(Os { code: 28, message: "No space left on device" })')
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert os.listdir(tmp_path) == []


def test_orphans_of_a_killed_writer_are_recognised(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "x").write_text("x")
    remove_folder(target)
    assert os.listdir(tmp_path) == []
    with staged_folder(tmp_path / "kept") as staging:
        leftover = staging.name  # the name a writer killed mid-write leaves behind
    (tmp_path / leftover).mkdir()  # as if its writer had been killed (this pid: not writing now)
    assert [p.name for p in remove_orphans(tmp_path)] == [leftover]
    assert os.listdir(tmp_path) == ["kept"]


def test_load_adapter_rejects_unknown_options(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    with pytest.raises(TypeError, match=r"unexpected option\(s\) \['r'\]"):
        load_adapter(tiny_llama(), folder, r=8)


def test_adapter_base_model_is_read_through_the_safe_json_reader(tmp_path: Path) -> None:
    from loraq.io.peft_format import adapter_base_model, is_adapter_folder

    folder = _saved(tmp_path)
    assert is_adapter_folder(folder) and not is_adapter_folder(tmp_path)
    _edit_config(folder, base_model_name_or_path="org/base")
    assert adapter_base_model(folder) == "org/base"
    _edit_config(folder, base_model_name_or_path=None)
    assert adapter_base_model(folder) is None
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"adapter_config.json is not valid JSON"):
        adapter_base_model(folder)
    with pytest.raises(FormatError, match=r"has no adapter_config.json"):
        adapter_base_model(tmp_path)
