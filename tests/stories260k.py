"""stories260K (llama2.c checkpoint, ../shared/models/stories260K) converted in memory.

The files are read where they lie, never copied into the repository; see SOURCE.md there for
the format. Tests that need them skip when the folder is absent.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

_RELATIVE = Path("shared") / "models" / "stories260K"
# ../shared beside the repository; a git worktree one level deeper finds the same folder
STORIES = next(
    (p / _RELATIVE for p in Path(__file__).resolve().parents[2:4] if (p / _RELATIVE).is_dir()),
    Path(__file__).resolve().parents[2] / _RELATIVE,
)
#: The first words llama2.c's run.c prints for stories260K at temperature 0 (SOURCE.md).
RUN_C_GREEDY = "Once upon a time, there was a little girl named Lily. She loved to play outside"


def load_stories260k(folder: Path):
    """The llama2.c stories260K checkpoint as a transformers LlamaForCausalLM (see SOURCE.md)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    raw = (folder / "stories260K.bin").read_bytes()
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("<7i", raw[:28])
    data = torch.frombuffer(bytearray(raw[28:]), dtype=torch.float32)
    kv_dim = dim * kv_heads // heads
    head = dim // heads
    offset = 0

    def take(*shape):
        nonlocal offset
        n = 1
        for s in shape:
            n *= s
        out = data[offset : offset + n].view(*shape).clone()
        offset += n
        return out

    def halves(w, n_heads):  # interleaved rotary pairs -> transformers' half-split order
        w = w.view(n_heads, head, -1)
        return torch.cat([w[:, 0::2], w[:, 1::2]], dim=1).reshape(n_heads * head, -1)

    emb = take(abs(vocab), dim)
    att_norm, wq = take(layers, dim), take(layers, dim, dim)
    wk, wv = take(layers, kv_dim, dim), take(layers, kv_dim, dim)
    wo, ffn_norm = take(layers, dim, dim), take(layers, dim)
    w1, w2, w3 = take(layers, hidden, dim), take(layers, dim, hidden), take(layers, hidden, dim)
    final_norm = take(dim)
    cfg = LlamaConfig(
        vocab_size=abs(vocab), hidden_size=dim, intermediate_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq_len,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": final_norm}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": att_norm[i],
            p + "post_attention_layernorm.weight": ffn_norm[i],
            p + "self_attn.q_proj.weight": halves(wq[i], heads),
            p + "self_attn.k_proj.weight": halves(wk[i], kv_heads),
            p + "self_attn.v_proj.weight": wv[i],
            p + "self_attn.o_proj.weight": wo[i],
            p + "mlp.gate_proj.weight": w1[i],
            p + "mlp.down_proj.weight": w2[i],
            p + "mlp.up_proj.weight": w3[i],
        }
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    return model.eval()


def decode_tokens(folder: Path, ids: list[int]) -> str:
    """Text of ``ids`` with the llama2.c tokenizer (tok512.bin): pieces and byte fallbacks."""
    raw = (folder / "tok512.bin").read_bytes()
    offset, pieces = 4, []
    for _ in range(512):
        _score, length = struct.unpack("<fi", raw[offset : offset + 8])
        pieces.append(raw[offset + 8 : offset + 8 + length])
        offset += 8 + length
    out = b"".join(bytes([i - 3]) if 3 <= i <= 258 else pieces[i] for i in ids)
    return out.decode("utf-8", errors="replace")
