"""Text generation for causal LMs: greedy or sampled (temperature, top-k, top-p), seeded.

A plain loop over the model's forward with its key/value cache: no ``GenerationConfig``, so
adapters, quantized layers and tiny test models all go through the same few lines.
"""

from __future__ import annotations

import inspect

import torch

from ..generation.sampling import sample_next


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Continue ``input_ids`` (1, T) by up to ``max_new_tokens``; returns only the new ids.

    Stops early at ``eos_token_id`` (which is not included in the result).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    ids = input_ids.to(device)
    new: list[torch.Tensor] = []
    past = None
    step_input = ids
    # transformers >= 5.2x calls the key/value cache `cache`; older versions `past_key_values`.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else None
    cache_arg = cache_arg or "past_key_values"
    try:
        for _ in range(max_new_tokens):
            out = model(input_ids=step_input, use_cache=True, **{cache_arg: past})
            past = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            token = sample_next(out.logits[:, -1, :], temperature, top_k, top_p, generator)
            if eos_token_id is not None and int(token[0]) == eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            # Without a cache (a model that returns none), feed the whole sequence again.
            step_input = token[:, None] if past is not None else ids
    finally:
        model.train(was_training)
    if not new:
        return torch.empty(0, dtype=torch.long)
    return torch.stack(new, dim=1)[0].cpu()


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> str:
    """Continue ``prompt`` and return the generated text (without the prompt).

    Greedy when ``temperature`` is 0; sampled otherwise, reproducibly for a given ``seed``.
    The prompt is tokenized with the tokenizer's special tokens (e.g. BOS), as in training.
    """
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], dtype=torch.long)
    new_ids = generate_ids(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(new_ids.tolist(), skip_special_tokens=True)
