"""Merges are all or nothing, merged files are never half-written, and ``--original`` must be
the base the adapter was trained on.

A failure is injected half-way (the second layer's weight write raises after it wrote) into
``merge``, ``unmerge`` and ``unload(merge_into=...)`` over dense, NF4 and GGUF (q4_0, q8_0)
bases; afterwards the outputs and the state dict must be bitwise what they were. Exports refuse
a non-regular ``--out`` and leave no temporary file when they fail (a full disk included).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loraq
from conftest import tiny_llama
from loraq import cli
from loraq.io import safe
from loraq.io.gguf_read import load_gguf
from loraq.io.gguf_write import export_gguf
from loraq.layers.lora import LoRALayer
from loraq.model.surgery import lora_layers
from test_train_support import make_tiny_llama, write_config, write_pattern_jsonl

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
BASES = [None, "nf4", "q4_0", "q8_0"]  # None: a dense base
QUANTIZED = [b for b in BASES if b is not None]


def adapted(quant: str | None, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny Llama (hidden 64: GGUF blocks are 32 wide) with a non-zero adapter over a base of
    ``quant``, and the dense model it was made from."""
    torch.manual_seed(seed)
    dense = tiny_llama(hidden=64)
    original = copy.deepcopy(dense)
    model = loraq.apply(dense, loraq.LoraConfig(r=4, alpha=8, quant=quant))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    return model.eval(), original


def state(model: torch.nn.Module) -> dict:
    """Everything a rollback must restore: outputs, state dict, module types, trainable flags."""
    with torch.no_grad():
        logits = model(input_ids=IDS).logits.clone()
    return {
        "logits": logits,
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
        "merged": {n: list(m.merged_adapters) for n, m in lora_layers(model)},
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = state(model)
    assert after["types"] == before["types"]
    assert after["trainable"] == before["trainable"]
    assert after["merged"] == before["merged"]
    assert list(after["tensors"]) == list(before["tensors"])
    for key, old in before["tensors"].items():
        new = after["tensors"][key]
        assert new.dtype == old.dtype and torch.equal(new, old), key
    assert torch.equal(after["logits"], before["logits"])


def fail_on_second_write(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Make the second base-weight write of any layer raise right after it wrote."""
    real = LoRALayer._write_base_matrix
    calls = {"n": 0}

    def flaky(self, matrix):
        real(self, matrix)
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure in the second layer")

    monkeypatch.setattr(LoRALayer, "_write_base_matrix", flaky)
    return calls


# ---------------------------------------------------------------------------------- rollback
@pytest.mark.parametrize("quant", BASES)
def test_merge_failing_half_way_changes_nothing(monkeypatch, quant) -> None:
    model, _ = adapted(quant)
    before = state(model)
    calls = fail_on_second_write(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        loraq.merge(model)
    assert calls["n"] == 2  # the first layer was merged (and the second written) before it failed
    assert_unchanged(model, before)
    assert not hasattr(model, "loraq_merge_error")


@pytest.mark.parametrize("quant", BASES)
def test_unmerge_failing_half_way_changes_nothing(monkeypatch, quant) -> None:
    model, _ = adapted(quant)
    with pytest.warns(UserWarning) if quant else contextlib.nullcontext():
        loraq.merge(model)  # a quantized base warns that re-quantizing is lossy
    before = state(model)
    fail_on_second_write(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        loraq.unmerge(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("quant", "into"),
    [(None, "dequantized")]
    + [(q, into) for q in QUANTIZED for into in ("dequantized", "original", "requantize")],
)
def test_unload_merge_into_failing_half_way_changes_nothing(monkeypatch, quant, into) -> None:
    model, original = adapted(quant)
    before = state(model)
    fail_on_second_write(monkeypatch)
    given = original if into == "original" else None
    with pytest.raises(RuntimeError, match="injected"):
        loraq.unload(model, merge_into=into, original=given, calibration=IDS)
    assert_unchanged(model, before)
    assert not hasattr(model, "loraq_merge_report")
    # and the model still merges once the fault is gone
    monkeypatch.undo()
    merged = loraq.unload(model, merge_into=into, original=given, calibration=IDS)
    assert merged.loraq_merge_report.into == into


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_unload_with_merge_dtype_restores_the_dtype(monkeypatch, quant) -> None:
    """``merge_dtype`` casts the whole model (parameters keep their identity, their data
    changes): a later failure must put the float32 data back."""
    model, _ = adapted(quant)
    before = state(model)
    fail_on_second_write(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        loraq.unload(model, merge_into="dequantized", merge_dtype=torch.float64, calibration=IDS)
    assert_unchanged(model, before)


def test_failing_calibration_after_the_merge_changes_nothing(monkeypatch) -> None:
    model, _ = adapted("nf4")
    before = state(model)
    from loraq.model import merging

    real, calls = merging.model_outputs, {"n": 0}

    def flaky(m, batch):
        calls["n"] += 1
        if calls["n"] == 2:  # the merged model's outputs: everything is merged by now
            raise MemoryError("injected")
        return real(m, batch)

    monkeypatch.setattr(merging, "model_outputs", flaky)
    with pytest.raises(MemoryError):
        loraq.unload(model, merge_into="requantize", calibration=IDS)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kind", ["meta", "sparse", "int", "nan"])
def test_unusable_original_tensor_is_refused_before_any_change(kind) -> None:
    model, original = adapted("nf4")
    before = state(model)
    weights = dict(original.state_dict())
    key = "model.layers.1.mlp.down_proj.weight"  # a late layer: found before the first change
    good = weights[key]
    weights[key] = {
        "meta": lambda: torch.empty(good.shape, device="meta"),
        "sparse": lambda: good.to_sparse(),
        "int": lambda: good.to(torch.int32),
        "nan": lambda: good.clone().fill_(float("nan")),
    }[kind]()
    with pytest.raises(ValueError, match=f"original tensor '{key}'"):
        loraq.unload(model, merge_into="original", original=weights, calibration=IDS)
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------- --original
@pytest.mark.parametrize("quant", QUANTIZED)
def test_original_of_another_model_is_refused_naming_the_layer(quant) -> None:
    model, original = adapted(quant)
    _, other = adapted(None, seed=1)  # same shapes, other weights
    before = state(model)
    with pytest.raises(ValueError) as info:
        loraq.unload(model, merge_into="original", original=other, calibration=IDS)
    message = str(info.value)
    assert "'model.layers.0.self_attn.q_proj' is not a quantization of the original" in message
    assert "\n" not in message
    assert_unchanged(model, before)
    # its own original, also when stored in bfloat16, is accepted
    half = {k: v.to(torch.bfloat16) for k, v in original.state_dict().items()}
    loraq.unload(copy.deepcopy(model), merge_into="original", original=half, calibration=IDS)
    loraq.unload(model, merge_into="original", original=original, calibration=IDS)


def test_original_of_another_model_is_refused_over_a_dense_base() -> None:
    """Over a dense (LoRA, not QLoRA) base the original must be that base itself."""
    model, original = adapted(None)
    _, other = adapted(None, seed=1)
    loraq.merge(model)  # a merged adapter is taken out of the base before the comparison
    before = state(model)
    with pytest.raises(ValueError, match="the layer 'model.layers.0.self_attn.q_proj' is not the"):
        loraq.unload(model, merge_into="original", original=other, calibration=IDS)
    assert_unchanged(model, before)
    merged = loraq.unload(model, merge_into="original", original=original, calibration=IDS)
    assert merged.loraq_merge_report.max_logit_diff < 1e-4


def test_original_check_catches_one_swapped_layer(tmp_path) -> None:
    model, original = adapted("nf4")
    _, other = adapted(None, seed=1)
    weights = dict(original.state_dict())
    key = "model.layers.1.mlp.up_proj.weight"
    weights[key] = other.state_dict()[key]
    with pytest.raises(ValueError, match="'model.layers.1.mlp.up_proj' is not a quantization"):
        loraq.export_merged(model, tmp_path / "m", merge_into="original", original=weights)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------- export_merged
def test_export_merged_failing_leaves_no_folder_and_the_model_unchanged(
    tmp_path, monkeypatch
) -> None:
    from loraq.io import merged_export

    model, _ = adapted("nf4")
    before = state(model)

    def full_disk(work, model, staging, dtype):
        (staging / "model.safetensors").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", str(staging / "model.safetensors"))

    monkeypatch.setattr(merged_export, "_write_dense", full_disk)
    out = tmp_path / "merged"
    with pytest.raises(OSError) as info:
        loraq.export_merged(model, out)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out)
    assert os.listdir(tmp_path) == []
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------- files
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("kind", ["fifo", "device-symlink"])
def test_writers_refuse_a_non_regular_target(tmp_path, kind) -> None:
    target = tmp_path / "out.gguf"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to(os.devnull)
    for write in (
        lambda: safe.atomic_write_text(target, "x"),
        lambda: safe.atomic_save_safetensors(target, {"a": torch.zeros(1)}),
        lambda: safe.staged_file(target).__enter__(),
        lambda: safe.staged_folder(target).__enter__(),
    ):
        with pytest.raises(FileExistsError, match="refusing to replace it"):
            write()
    assert os.listdir(tmp_path) == ["out.gguf"]
    if kind == "fifo":
        assert target.is_fifo()
    else:
        assert target.is_symlink() and target.is_char_device()


def test_a_dead_writers_temporary_file_is_removed_by_the_next_write(tmp_path) -> None:
    target = tmp_path / "model.gguf"
    orphan = tmp_path / f".tmp-model.gguf-0123abcd-{dead_pid()}"
    orphan.write_bytes(b"\0" * 1000)
    old = tmp_path / f".old-model.gguf-0123abcd-{dead_pid()}"
    old.mkdir()
    keep = [
        tmp_path / ".tmp-model.gguf-0123abcd-1",  # pid 1 is alive: not ours to remove
        tmp_path / f".tmp-other.gguf-0123abcd-{dead_pid()}",  # another file's
        tmp_path / f".tmp-model.gguf-my-notes-{dead_pid()}",  # not a writer's name
    ]
    for path in keep:
        path.write_bytes(b"\0")
    with safe.staged_file(target) as tmp:
        assert tmp.name.startswith(".tmp-model.gguf-") and tmp.name.endswith(f"-{os.getpid()}")
        tmp.write_bytes(b"new")
    assert sorted(os.listdir(tmp_path)) == sorted([target.name] + [p.name for p in keep])
    # a folder writer cleans its own the same way
    folder = tmp_path / "merged"
    orphan = tmp_path / f".tmp-merged-89abcdef-{dead_pid()}"
    orphan.mkdir()
    with safe.staged_folder(folder) as staging:
        (staging / "a.json").write_text("{}")
    assert not orphan.exists() and (folder / "a.json").is_file()


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError("1024 requested and 376 written"),  # numpy's tofile on a full disk
        RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
    ],
)
def test_staged_writes_report_a_full_disk_naming_the_file(tmp_path, error) -> None:
    target = tmp_path / "out.gguf"
    with pytest.raises(OSError) as info, safe.staged_file(target) as tmp:
        tmp.write_bytes(b"\0" * 376)
        raise error
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def gguf_adapter(tmp_path_factory) -> Path:
    """An adapter folder over a q8_0 GGUF base file (found through adapter_config.json)."""
    tmp = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)
    base_file = export_gguf(tiny_llama(), tmp / "base.gguf", merged=True, dtype="q8_0")
    base, _ = load_gguf(base_file)
    model = loraq.apply(base, loraq.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    loraq.save_adapter(model, tmp / "adapter")
    return tmp / "adapter"


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("kind", ["fifo", "device-symlink"])
def test_cli_export_refuses_a_non_regular_out(gguf_adapter, tmp_path, capsys, kind) -> None:
    out = tmp_path / "out.gguf"
    if kind == "fifo":
        os.mkfifo(out)
    else:
        out.symlink_to(os.devnull)
    argv = ["export", "--format", "gguf", "--adapter", str(gguf_adapter), "--out", str(out)]
    assert cli.main(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"loraq export: error: {out} exists and is not a regular file")
    assert os.listdir(tmp_path) == ["out.gguf"]
    assert out.is_fifo() if kind == "fifo" else out.is_char_device()


def test_cli_export_on_a_full_disk(gguf_adapter, tmp_path, capsys, monkeypatch) -> None:
    import gguf

    def short_write(self, *args, **kwargs):
        self.fout[0].write(b"\0" * 376)  # a partial tensor, then numpy's short-write error
        raise OSError("1024 requested and 376 written")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", short_write)
    out = tmp_path / "model.gguf"
    argv = ["export", "--format", "gguf", "--adapter", str(gguf_adapter), "--merged"]
    assert cli.main([*argv, "--out", str(out)]) == 2
    assert one_error_line(capsys) == f"loraq export: error: no space left on device ({out})"
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory) -> tuple[Path, Path]:
    """``(adapter folder of a 2-step NF4 QLoRA run, a same-shaped model with other weights)``."""
    tmp = tmp_path_factory.mktemp("qlora")
    llama = make_tiny_llama(tmp / "llama")
    other = make_tiny_llama(tmp / "other", seed=1)
    data = write_pattern_jsonl(tmp / "pattern.jsonl", n=8)
    config = write_config(
        tmp / "config.yaml",
        {
            "model": {"path": str(llama), "task": "causal-lm"},
            "data": {"train": str(data), "max_length": 32},
            "lora": {"r": 4, "alpha": 8, "quant": "nf4"},
            "training": {"batch_size": 4, "eval_before": False, "progress": False},
        },
    )
    out = tmp / "run"
    assert cli.main(["train", str(config), "--max_steps", "2", "--output_dir", str(out)]) == 0
    return out / "adapter", other


def test_cli_merge_refuses_an_original_of_another_model(qlora_run, tmp_path, capsys) -> None:
    adapter, other = qlora_run
    out = tmp_path / "merged"
    argv = ["merge", "--adapter", str(adapter), "--out", str(out), "--into", "original"]
    assert cli.main([*argv, "--original", str(other)]) == 2
    line = one_error_line(capsys)
    assert line.startswith("loraq merge: error: merge_into='original': the quantized layer 'model.")
    assert "is not a quantization of the original's weights" in line
    assert os.listdir(tmp_path) == []
    # the base it was trained on (the default) merges
    assert cli.main(argv) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
    ],
)
def test_cli_merge_on_a_full_disk(qlora_run, tmp_path, capsys, monkeypatch, error) -> None:
    import transformers.modeling_utils as modeling_utils

    def full_disk(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 100)
        raise error

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)
    adapter, _ = qlora_run
    out = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 2
    assert one_error_line(capsys) == f"loraq merge: error: no space left on device ({out})"
    assert os.listdir(tmp_path) == []


def test_cli_merge_refuses_a_fifo_out(qlora_run, tmp_path, capsys) -> None:
    adapter, _ = qlora_run
    out = tmp_path / "merged"
    os.mkfifo(out)
    assert cli.main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 2
    assert "is not a folder (it is a named pipe (FIFO))" in one_error_line(capsys)
    assert out.is_fifo()
