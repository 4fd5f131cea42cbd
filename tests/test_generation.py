"""loraq.generate: a batch over several adapters equals each adapter's own generation."""

from __future__ import annotations

import pytest
import torch

import loraq
from loraq.generation.decode import DecodeBatch, SamplingParams, SequenceState, generate_ids
from loraq.generation.text import ReplyText, held_back, truncate_at_stop
from tiny_lm import byte_tokenizer, randomize_adapters, single_thread, tiny_causal_lm  # noqa: F401


@pytest.fixture(scope="module")
def setup():
    model = tiny_causal_lm()
    loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, targets="all-linear"), "a")
    loraq.apply(model, loraq.LoraConfig(r=8, alpha=8, targets=["q_proj", "v_proj"]), "b")
    loraq.apply(model, loraq.LoraConfig(r=2, targets="all-linear", use_dora=True), "c")
    torch.manual_seed(0)
    randomize_adapters(model, 0.5)
    return model.eval(), byte_tokenizer()


PROMPTS = ["Once upon", "a", "The quick brown fox", "hi", "zz top", "Once upon"]
NAMES = ["a", "b", "c", None, "a", "c"]


def _alone(model, tok, prompt, name, **kw):
    return loraq.generate(model, tok, [prompt], [name], **kw)[0]


def test_mixed_greedy_equals_each_adapter_alone(setup):
    model, tok = setup
    mixed = loraq.generate(model, tok, PROMPTS, NAMES, max_new_tokens=12)
    alone = [_alone(model, tok, p, n, max_new_tokens=12) for p, n in zip(PROMPTS, NAMES)]
    assert mixed == alone
    # the adapters really differ: the same prompt gives different text per adapter
    assert len({_alone(model, tok, "Once upon", n, max_new_tokens=12) for n in NAMES}) == 4


def test_mixed_greedy_equals_ungrouped_reference_token_for_token(setup):
    """A plain full-recompute loop with one adapter active (no cache, no batch) as reference."""
    model, tok = setup
    for prompt, name in zip(PROMPTS, NAMES):
        ids = tok(prompt)["input_ids"]
        seq = SequenceState(list(ids), name, SamplingParams(max_new_tokens=8))
        loraq.generation.decode.run_to_completion(model, [seq])
        ref = list(ids)
        with torch.no_grad():
            for _ in range(8):
                if name is None:
                    with loraq.disable_adapters(model):
                        logits = model(torch.tensor([ref])).logits
                else:
                    loraq.set_adapter(model, name)
                    logits = model(torch.tensor([ref])).logits
                ref.append(int(logits[0, -1].argmax()))
        assert seq.generated == ref[len(ids) :]


def test_continuous_batching_small_batches_give_same_result(setup):
    model, tok = setup
    full = loraq.generate(model, tok, PROMPTS, NAMES, max_new_tokens=10)
    assert loraq.generate(model, tok, PROMPTS, NAMES, max_new_tokens=10, max_batch=2) == full


def test_sampling_per_row_seed_reproduces_alone(setup):
    model, tok = setup
    kw = dict(max_new_tokens=10, temperature=0.9, top_k=40, top_p=0.95)
    seeds = [1, 2, 3, 4, 5, 6]
    mixed = loraq.generate(model, tok, PROMPTS, NAMES, seed=seeds, **kw)
    alone = [_alone(model, tok, p, n, seed=s, **kw) for p, n, s in zip(PROMPTS, NAMES, seeds)]
    assert mixed == alone
    assert loraq.generate(model, tok, PROMPTS, NAMES, seed=[9] * 6, **kw) != mixed


def test_stop_strings_and_per_row_stop(setup):
    model, tok = setup
    full = loraq.generate(model, tok, PROMPTS[:3], NAMES[:3], max_new_tokens=12)
    stop = full[0][3:5]
    cut = loraq.generate(model, tok, PROMPTS[:3], NAMES[:3], max_new_tokens=12, stop=[stop])
    for text, whole in zip(cut, full):
        expected = whole[: whole.find(stop)] if stop in whole else whole
        assert text == expected
    assert len(cut[0]) == 3


def test_decode_batch_rows_join_and_leave(setup):
    model, _ = setup
    seqs = [
        SequenceState([256, 70 + i], n, SamplingParams(max_new_tokens=3 + i))
        for i, n in enumerate("abc")
    ]
    batch = DecodeBatch(model, pad_token_id=258)
    batch.add(seqs[:1])
    batch.step()
    batch.add(seqs[1:])  # joins a running batch with a longer cache
    while len(batch):
        batch.step()
        batch.remove(batch.finished())
    for seq in seqs:
        alone = SequenceState(list(seq.prompt_ids), seq.adapter, seq.params)
        loraq.generation.decode.run_to_completion(model, [alone])
        assert alone.generated == seq.generated
        assert seq.finish_reason == "length"


def test_generate_bad_input(setup):
    model, tok = setup
    with pytest.raises(TypeError, match="list of strings"):
        loraq.generate(model, tok, "hello")
    with pytest.raises(ValueError, match="2 entries but there are 1 prompts"):
        loraq.generate(model, tok, ["x"], ["a", "b"])
    with pytest.raises(ValueError, match="'nope' is not an adapter"):
        loraq.generate(model, tok, ["x"], ["nope"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        loraq.generate(model, tok, ["x"], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        loraq.generate(model, tok, ["x"], temperature=1.0, top_p=0.0)


def test_stories260k_batched_rows_match_run_c_and_each_adapter_alone():
    from stories260k import RUN_C_GREEDY, STORIES, decode_tokens, load_stories260k

    if not (STORIES / "stories260K.bin").is_file():
        pytest.skip("stories260K not found at ../shared/models/stories260K")
    model = load_stories260k(STORIES)
    for i, r in enumerate((4, 8)):
        loraq.apply(model, loraq.LoraConfig(r=r, alpha=r, targets="all-linear"), f"s{i}")
    torch.manual_seed(4)
    randomize_adapters(model, 0.5)
    names = [None, "s0", "s1", "s0", None]
    prompts = [[1], [1], [1, 403, 261], [1, 403], [1, 403, 261]]
    seqs = [SequenceState(p, n, SamplingParams(max_new_tokens=20)) for p, n in zip(prompts, names)]
    loraq.generation.decode.run_to_completion(model, seqs)
    assert decode_tokens(STORIES, seqs[0].generated).strip().startswith(RUN_C_GREEDY[:60])
    for seq in seqs[1:]:
        alone = SequenceState(list(seq.prompt_ids), seq.adapter, seq.params)
        loraq.generation.decode.run_to_completion(model, [alone])
        assert alone.generated == seq.generated
    assert seqs[1].generated != seqs[0].generated  # the adapter changes the story


# ----------------------------------------------------------------------------- reply text
MULTI_BYTE = "naïve café → 3€, 日本語 and 🙂🙃: done."


def _streamed(tok, ids, stops=(), step=1):
    """(pieces handed out while ids arrive ``step`` at a time, the final text)."""
    reply = ReplyText(tok, stops)
    pieces = []
    for i in range(0, len(ids), step):
        reply.add(ids[i : i + step])
        pieces.append(reply.take())
        if reply.stopped:
            break
    reply.finish()
    pieces.append(reply.take())
    return pieces, reply.text


@pytest.mark.parametrize("step", [1, 2, 5])
def test_reply_text_streams_exactly_the_full_decode_with_split_characters(step):
    tok = byte_tokenizer()
    ids = tok(MULTI_BYTE, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(MULTI_BYTE)  # characters really are split over tokens
    pieces, text = _streamed(tok, ids, step=step)
    assert "".join(pieces) == text == MULTI_BYTE
    # no piece ever shows half a character
    assert not any("\ufffd" in p for p in pieces)
    # special tokens are skipped, as in the full decode
    pieces, text = _streamed(tok, [tok.bos_token_id, *ids, tok.eos_token_id], step=step)
    assert "".join(pieces) == text == MULTI_BYTE


def test_reply_text_equals_the_full_decode_of_invalid_and_unfinished_bytes():
    tok = byte_tokenizer()
    # byte ids of the tokenizer (0-255 in its sorted alphabet): random bytes, often invalid UTF-8
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, 256, (40,), generator=gen).tolist()
        pieces, text = _streamed(tok, ids)
        assert "".join(pieces) == text == tok.decode(ids, skip_special_tokens=True)
    euro = tok("€", add_special_tokens=False)["input_ids"]
    pieces, text = _streamed(tok, euro[:2])  # the reply ends inside a character
    assert "".join(pieces) == text == tok.decode(euro[:2]) == "\ufffd"


@pytest.mark.parametrize("stop", ["→", "🙂🙃", "e\u0301", "and", "é →", ": d", "x"])
def test_reply_text_cuts_at_stop_strings_and_never_streams_past_them(stop):
    tok = byte_tokenizer()
    ids = tok(MULTI_BYTE, add_special_tokens=False)["input_ids"]
    pieces, text = _streamed(tok, ids, stops=[stop, "never"])
    expected = MULTI_BYTE.split(stop)[0]
    assert text == expected and "".join(pieces) == expected


def test_truncate_at_stop_and_held_back():
    assert truncate_at_stop("abcabc", ["ca", "bc"]) == ("a", True)
    assert truncate_at_stop("abcabc", ["zz", ""]) == ("abcabc", False)
    assert truncate_at_stop("abcabc", ["bc"], start=2) == ("abca", True)
    assert held_back("hello wor", ["world", "xo"]) == 3
    assert held_back("hello", ["lo!", "hello!"]) == 5
    assert held_back("hello", []) == 0


def test_generate_ids_is_the_same_loop_as_generate(setup):
    model, tok = setup
    loraq.set_adapter(model, "b")
    ids = tok("Once upon")["input_ids"]
    new = generate_ids(model, torch.tensor([ids]), max_new_tokens=9)
    assert new.dtype == torch.long and new.ndim == 1 and len(new) == 9
    # without adapter_names every row runs the model as it is set up: here adapter b
    (text,) = loraq.generate(model, tok, ["Once upon"], max_new_tokens=9)
    assert text == tok.decode(new.tolist(), skip_special_tokens=True)
    assert text == _alone(model, tok, "Once upon", "b", max_new_tokens=9)
    assert len(generate_ids(model, ids, max_new_tokens=0)) == 0
    stop_at = int(new[3])
    early = generate_ids(model, ids, max_new_tokens=9, eos_token_id=stop_at)
    assert early.tolist() == new.tolist()[: new.tolist().index(stop_at)]
