"""A tiny causal LM with a real (byte-level) tokenizer, built in code and saved as an HF folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import loraq

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<pad>"]


def byte_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A transformers fast tokenizer over the 256 byte symbols plus BOS, EOS and PAD (259 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in SPECIALS:
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def tiny_causal_lm(layers: int = 2, hidden: int = 32, seed: int = 0, max_positions: int = 128):
    """A random-weight Llama over the byte tokenizer's 259 ids (vocab padded to 260)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=260,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    return LlamaForCausalLM(cfg).eval()


def save_tiny_folder(
    path: Path, chat_template: str | None = CHAT_TEMPLATE, max_positions: int = 128
) -> Path:
    """Write the tiny model and its tokenizer as a transformers folder; returns ``path``."""
    tiny_causal_lm(max_positions=max_positions).save_pretrained(path)
    byte_tokenizer(chat_template).save_pretrained(path)
    return path


def randomize_adapters(model: torch.nn.Module, scale: float = 0.3) -> None:
    """Nonzero B matrices (a fresh adapter is an exact no-op and would prove nothing)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                param.normal_(0, scale)
            if "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.2 * torch.rand_like(param))


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matrices: one thread avoids OpenMP hand-off costs that dominate on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rows_run_alone(model: torch.nn.Module, names, ids: torch.Tensor) -> torch.Tensor:
    """Logits of each row of ``ids`` run alone with its own adapter of ``model`` active (a name
    of ``names``), or the bare base (None): the reference a mixed-adapter batch must equal."""
    rows = []
    for i, name in enumerate(names):
        if name is None:
            with loraq.disable_adapters(model):
                rows.append(model(ids[i : i + 1]).logits)
        else:
            loraq.set_adapter(model, name)
            rows.append(model(ids[i : i + 1]).logits)
    return torch.cat(rows)
