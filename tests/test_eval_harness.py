"""``loraq eval --tasks`` / ``--perplexity``: lm-eval on loraq models, checked against lm-eval.

The tiny byte-level Llama of :mod:`tiny_lm` (fp32; adapters with ``compute_dtype: float32``)
scores the shipped task ``examples/eval/loraq_tiny_mc`` (a few items: ``--limit``) three ways:
lm-eval's own ``hf`` model (with ``peft=ADAPTER`` for the adapter), and ``loraq eval --tasks``
in process with the base and two adapters in one table. Per-item log-likelihoods are sums over
a few tokens of fp32 log-softmax values: they agree to 1e-4.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

import loraq
from loraq import cli
from loraq.eval import command as eval_command
from loraq.eval.offline import offline
from loraq.eval.perplexity import perplexity, windows, word_count
from tiny_lm import byte_tokenizer, randomize_adapters, single_thread, tiny_causal_lm  # noqa: F401

lm_eval = pytest.importorskip("lm_eval")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "eval"
TASK = "loraq_tiny_mc"
LIMIT = 4
#: fp32 sums of a few log-probabilities each.
ATOL = 1e-4
TEXT = "Once upon a time there was a tiny model.\nIt read every byte  of this story twice.\n"


def _train_adapter(base: Path, out: Path, seed: int) -> Path:
    """A loraq adapter after a few optimizer steps on a line of text (B starts nonzero, so the
    adapter changes the scores from the first step)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    cfg = loraq.LoraConfig(r=4, alpha=8, targets="all-linear", compute_dtype="float32")
    loraq.apply(model, cfg)
    randomize_adapters(model)
    ids = tok(["The sun rises in the east."], return_tensors="pt").input_ids
    opt = torch.optim.AdamW(loraq.trainable_parameters(model), lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    loraq.save_adapter(model, out)
    return out


def _save_base(path: Path) -> Path:
    """The tiny model with exactly the tokenizer's 259 ids: lm-eval's ``peft=`` path resizes
    the embeddings to ``len(tokenizer)`` first, which would drop the padded 260th logit and
    shift every log-softmax."""
    tokenizer = byte_tokenizer()
    model = tiny_causal_lm()
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    base = _save_base(root / "base")
    return base, _train_adapter(base, root / "a", 1), _train_adapter(base, root / "b", 2)


def _item_loglikelihoods(samples: list[dict]) -> dict[int, list[float]]:
    """``{doc_id: [log-likelihood of each choice]}`` from lm-eval's logged samples."""
    return {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in samples}


def _lm_eval_hf(model_args: dict) -> dict:
    from lm_eval.tasks import TaskManager

    result = lm_eval.simple_evaluate(
        model="hf",
        model_args={"device": "cpu", "dtype": "float32", "batch_size": 1, **model_args},
        tasks=[TASK],
        limit=LIMIT,
        task_manager=TaskManager(include_path=str(EXAMPLES)),
        log_samples=True,
    )
    return result


@pytest.fixture(scope="module")
def three_ways(folders, tmp_path_factory):
    """lm-eval's hf model on the base and with ``peft=a``; loraq eval with base, a and b."""
    base, a, b = folders
    out = tmp_path_factory.mktemp("scores") / "scores.json"
    argv = ["eval", "--model", str(base), "--adapter", f"a={a}", "--adapter", f"b={b}"]
    argv += ["--tasks", TASK, "--include-path", str(EXAMPLES), "--limit", str(LIMIT)]
    assert cli.main([*argv, "--batch-size", "4", "--output", str(out)]) == 0
    ours = json.loads(out.read_text())
    theirs = {"base": _lm_eval_hf({"pretrained": str(base)})}
    theirs["a"] = _lm_eval_hf({"pretrained": str(base), "peft": str(a)})
    return ours, theirs


def test_loraq_eval_agrees_with_lm_eval_hf_and_peft(three_ways):
    ours, theirs = three_ways
    assert ours["columns"] == ["base", "a", "b"]
    for column in ("base", "a"):
        mine = ours["scores"][column]
        lls = _item_loglikelihoods(mine["samples"][TASK])
        ref = _item_loglikelihoods(theirs[column]["samples"][TASK])
        assert sorted(lls) == sorted(ref) and len(ref) == LIMIT
        for doc_id, values in ref.items():
            assert lls[doc_id] == pytest.approx(values, abs=ATOL, rel=0), column
        for metric in ("acc,none", "acc_norm,none"):
            assert mine["results"][TASK][metric] == theirs[column]["results"][TASK][metric]


def test_each_adapter_gets_its_own_column(three_ways):
    ours, _ = three_ways
    cols = {c: _item_loglikelihoods(ours["scores"][c]["samples"][TASK]) for c in ours["columns"]}
    # The adapters change the scores, each differently: a column is not the base scored again.
    for one, other in (("base", "a"), ("base", "b"), ("a", "b")):
        diffs = [abs(x - y) for d in cols[one] for x, y in zip(cols[one][d], cols[other][d])]
        assert max(diffs) > 1e-2


def test_table_has_one_column_per_variant(folders, capsys):
    from loraq.eval.report import format_table

    scores = {
        name: {"results": {TASK: {"acc,none": v, "acc_stderr,none": 0.1, "sample_len": 4}}}
        for name, v in (("base", 0.25), ("a", 0.5))
    }
    header, row = format_table(scores).splitlines()
    assert header.split() == ["task", "metric", "base", "a"]
    assert row.split() == [TASK, "acc", "0.2500", "±", "0.1000", "0.5000", "±", "0.1000"]


def test_nf4_base_scores_through_lm_eval(folders):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraq.eval.harness import score_tasks
    from loraq.eval.variants import variants

    base, _, _ = folders
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = loraq.LoraConfig(r=4, targets="all-linear", quant="nf4", compute_dtype="float32")
    loraq.apply(model, cfg, "q")
    randomize_adapters(model)
    tok = AutoTokenizer.from_pretrained(base)
    scores = score_tasks(
        model, tok, [TASK], variants(["q"]), include_path=[EXAMPLES], limit=2, log_samples=True
    )
    lls = {c: _item_loglikelihoods(s["samples"][TASK]) for c, s in scores.items()}
    assert list(lls) == ["base", "q"]
    assert all(math.isfinite(x) for doc in lls["q"].values() for x in doc)
    assert lls["base"] != lls["q"]


# ----------------------------------------------------------------------------- perplexity
def test_windows_score_every_token_once():
    for n, length, stride in [(1, 4, 4), (7, 4, 4), (7, 4, 2), (9, 4, 1), (3, 8, 5), (20, 6, 4)]:
        scored = []
        for start, end, first in windows(n, length, stride):
            assert end - start <= length and start <= first - 1
            scored += range(first, end + 1)
        assert scored == list(range(1, n + 1))
    with pytest.raises(ValueError, match="stride"):
        windows(5, 4, 5)


def _tiny(folders):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = folders[0]
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(), (
        AutoTokenizer.from_pretrained(base)
    )


def test_perplexity_equals_lm_eval_rolling_loglikelihood(folders):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = _tiny(folders)
    length = 16  # the text is ~90 tokens: several windows, the last one a partial block
    lm = HFLM(pretrained=model, tokenizer=tok, max_length=length, batch_size=1)
    request = Instance("loglikelihood_rolling", {}, (TEXT,), 0)
    (reference,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    ours = perplexity(model, tok, TEXT, max_length=length)
    assert ours.loglikelihood == pytest.approx(reference, abs=ATOL * 10, rel=1e-6)
    assert ours.word_perplexity == pytest.approx(math.exp(-reference / word_count(TEXT)), rel=1e-5)
    n_bytes = len(TEXT.encode())
    assert ours.bits_per_byte == pytest.approx(-reference / n_bytes / math.log(2), rel=1e-5)
    assert ours.tokens == len(tok.encode(TEXT)) and ours.words == len(TEXT.split()) + 1


def test_smaller_stride_gives_more_context(folders):
    model, tok = _tiny(folders)
    whole = perplexity(model, tok, TEXT, max_length=128)  # one window: stride cannot matter
    assert perplexity(model, tok, TEXT, 128, stride=7).loglikelihood == pytest.approx(
        whole.loglikelihood, abs=1e-3
    )
    short = perplexity(model, tok, TEXT, max_length=8)
    strided = perplexity(model, tok, TEXT, max_length=8, stride=2)
    assert strided.loglikelihood != pytest.approx(short.loglikelihood, abs=1e-3)


def test_cli_perplexity_columns_and_merge(folders, tmp_path, capsys):
    base, a, _ = folders
    text = tmp_path / "story.txt"
    text.write_text(TEXT)
    argv = ["eval", "--model", str(base), "--adapter", str(a), "--perplexity", str(text)]
    assert cli.main([*argv, "--max-length", "32", "--stride", "16", "--merge", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert list(scores) == ["base", "adapter", "adapter+merged"]
    ll = {k: v["story.txt"]["loglikelihood"] for k, v in scores.items()}
    assert ll["adapter"] == pytest.approx(ll["adapter+merged"], abs=1e-3)
    assert abs(ll["adapter"] - ll["base"]) > 1e-2
    assert scores["base"]["story.txt"]["stride"] == 16


# ----------------------------------------------------------------------------- the command
def test_offline_only_when_asked(folders, tmp_path, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    seen = []
    model, tok = _tiny(folders)

    def load(model_path, adapters, dense_base):
        seen.append({k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")})
        return model, tok

    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    parser = cli.build_parser()
    for extra in ([], ["--offline"]):
        args = parser.parse_args(["eval", "--model", "m", "--perplexity", str(text), *extra])
        assert eval_command.run(args, load) == 0
    assert seen == [
        {"HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None},
        {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    ]
    assert "HF_DATASETS_OFFLINE" not in os.environ  # restored
    with offline():
        from huggingface_hub import constants

        assert constants.HF_HUB_OFFLINE
    assert "HF_HUB_OFFLINE" not in os.environ


def test_cli_eval_command_is_online_unless_asked(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = []
    command = cli.SUBCOMMANDS["eval"]
    monkeypatch.setattr(
        command, "run", lambda args: seen.append(os.environ.get("HF_HUB_OFFLINE")) or 0
    )
    assert cli.main(["eval", "--model", "m", "--tasks", "x"]) == 0
    assert seen == [None]


def test_without_lm_eval_the_command_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert cli.main(["eval", "--model", "m", "--tasks", TASK]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'loraq[eval]'" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "m"], "exactly one of --data"),
        (["--model", "m", "--tasks", "t", "--perplexity", "f"], "exactly one of --data"),
        (["--model", "m", "--tasks", "t", "--stride", "2"], "--stride applies to --perplexity"),
        (["--adapter", "x", "--adapter", "y", "--tasks", "t"], "name each of several adapters"),
        (["--adapter", "base=x", "--tasks", "t"], "'base' is taken"),
        (["--adapter", "a=x", "--adapter", "b=y", "--merge", "--tasks", "t"], "--merge needs"),
        (["--model", "m", "--tasks", "t", "--limit", "0"], "--limit must be a positive integer"),
    ],
)
def test_bad_options_are_one_line_errors(argv, message, capsys):
    assert cli.main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_unknown_task_names_the_task(folders, capsys):
    base, _, _ = folders
    argv = ["eval", "--model", str(base), "--tasks", "no_such_task_xyz", "--include-path"]
    assert cli.main([*argv, str(EXAMPLES)]) == 2
    assert "no_such_task_xyz" in capsys.readouterr().err


# ----------------------------------------------------------------------------- logprobs
def _two_adapter_model():
    model = tiny_causal_lm()
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(10 + i)
        cfg = loraq.LoraConfig(r=4, alpha=8, targets="all-linear", compute_dtype="float32")
        loraq.apply(model, cfg, name)
    randomize_adapters(model)
    return model.eval()


def _reference_logprobs(model, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """log_softmax (fp32) of the model's logits over ``ids`` alone, with ``adapter`` active."""
    context = loraq.disable_adapters(model) if adapter is None else contextlib.nullcontext()
    if adapter is not None:
        loraq.set_adapter(model, adapter)
    with context, torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_decode_logprobs_equal_log_softmax_in_mixed_adapter_batches():
    from loraq.generation.decode import SamplingParams, SequenceState, run_to_completion

    model = _two_adapter_model()
    rows = [  # (prompt, adapter, params): three adapters, scoring and sampling in one batch
        ([256, 72, 101, 108], "a", SamplingParams(5, logprobs=3, prompt_logprobs=True)),
        ([256, 9, 8, 7, 6, 5, 4], "b", SamplingParams(4, temperature=1.0, seed=3, logprobs=2)),
        ([256, 40, 41], None, SamplingParams(0, logprobs=1, prompt_logprobs=True)),
        ([256, 33], "a", SamplingParams(3)),
    ]
    seqs = [SequenceState(list(p), name, params) for p, name, params in rows]
    run_to_completion(model, seqs, pad_token_id=258)
    assert seqs[2].generated == [] and seqs[2].finish_reason == "length"
    assert seqs[3].logprobs == [] and seqs[3].prompt_logprobs == []
    for seq in seqs[:3]:
        full = seq.prompt_ids + seq.generated
        ref = _reference_logprobs(model, seq.adapter, full)
        k = seq.params.logprobs
        stopped = seq.finish_reason == "stop"  # by EOS: its logprob is reported too
        assert len(seq.logprobs) == len(seq.generated) + stopped
        if stopped:
            full.append(seq.logprobs[-1].token)
            ref = _reference_logprobs(model, seq.adapter, full[:-1])
            ref = torch.cat([ref, ref[-1:]])  # the last row is unused: no token after EOS
        got = list(seq.prompt_logprobs[1:]) + seq.logprobs
        first = 1 if seq.params.prompt_logprobs else len(seq.prompt_ids)
        if seq.params.prompt_logprobs:
            assert seq.prompt_logprobs[0] is None
            assert len(seq.prompt_logprobs) == len(seq.prompt_ids)
        for offset, item in enumerate(got):
            pos = first + offset  # the token at pos is predicted from position pos - 1
            assert item.token == full[pos]
            assert item.logprob == pytest.approx(ref[pos - 1, full[pos]].item(), abs=1e-4)
            values, ids = ref[pos - 1].topk(k)
            assert [t for t, _ in item.top] == ids.tolist()
            assert [v for _, v in item.top] == pytest.approx(values.tolist(), abs=1e-4)


#: A prompt's logprobs alone vs. beside longer and shorter rows (left padding, other adapters):
#: in fp32 the rows' sums differ only in rounding (measured 5e-7); in bf16 the logits themselves
#: are rounded to 8 bits, so a logit of a few units moves by ~2^-7 (measured 2e-3).
BATCH_ATOL = {"float32": 1e-5, "bfloat16": 2**-6}


def _scored(model, groups, target) -> list[float]:
    """Prompt and greedy-generated logprobs of row ``target`` (``(ids, adapter)``) when the
    ``groups`` of rows join one decode batch one group after another (a step between groups)."""
    from loraq.generation.decode import DecodeBatch, SamplingParams, SequenceState

    batch, found = DecodeBatch(model, pad_token_id=258), None
    for group in groups:
        params = SamplingParams(3, logprobs=2, prompt_logprobs=True)
        seqs = [SequenceState(list(ids), adapter, params) for ids, adapter in group]
        batch.add(seqs)
        found = found or next((s for s, row in zip(seqs, group) if row == target), None)
        batch.step()
    while not all(s.finished for s in batch.sequences):
        batch.step()
    return [x.logprob for x in found.prompt_logprobs[1:]] + [x.logprob for x in found.logprobs]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_prompt_scores_the_same_alone_and_in_a_mixed_batch(dtype):
    model = tiny_causal_lm()
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(10 + i)
        loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, targets="all-linear"), name)
    randomize_adapters(model)
    model.to(getattr(torch, dtype)).eval()
    target = ([256, *range(60, 75)], "a")
    longer, shorter = ([256, *range(100, 140)], "b"), ([256, 5, 6], None)
    alone = _scored(model, [[target]], target)
    assert len(alone) == 15 + 3
    for groups in (
        [[longer, target, shorter]],  # one prefill: padded on the left to the longest row
        [[longer], [shorter], [target]],  # joins a running batch whose cache is longer
        [[shorter], [target, longer]],
    ):
        mixed = _scored(model, groups, target)
        assert mixed == pytest.approx(alone, abs=BATCH_ATOL[dtype], rel=0), groups


def test_server_scores_a_prompt_the_same_alone_and_beside_others(live_server, monkeypatch):
    """A list of prompts of different lengths, queued while the engine is busy, is one prefill
    batch: each prompt's echoed logprobs equal those of the prompt sent on its own (fp32)."""
    import concurrent.futures as cf
    import threading
    import time

    from loraq.generation.decode import DecodeBatch

    groups, busy = [], threading.Event()
    add = DecodeBatch.add

    def held_add(batch, seqs):  # the first prefill waits until the test lets it go on
        groups.append(len(seqs))
        if len(groups) == 1:
            busy.wait(30)
        return add(batch, seqs)

    monkeypatch.setattr(DecodeBatch, "add", held_add)
    prompts = [[256, 7, 8], [256, *range(60, 75)], [256, *range(100, 140)]]
    body = {"model": "a", "max_tokens": 0, "echo": True, "logprobs": 0}
    engine = live_server.engine

    def until(condition, what: str) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    with live_server.client() as client, cf.ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(client.post, "/v1/completions", json={**body, "prompt": [256]})
            until(lambda: groups == [1], "the engine never took the first request")
            together = pool.submit(client.post, "/v1/completions", json={**body, "prompt": prompts})
            until(lambda: engine._queue.qsize() == len(prompts), "the prompts never queued")
        finally:
            busy.set()
        assert first.result().status_code == 200
        choices = together.result().json()["choices"]
        assert groups[:2] == [1, len(prompts)]  # the list was scored in one batch
        for ids, choice in zip(prompts, choices):
            alone = client.post("/v1/completions", json={**body, "prompt": ids}).json()
            expected = alone["choices"][0]["logprobs"]["token_logprobs"][1:]
            got = choice["logprobs"]["token_logprobs"][1:]
            assert len(got) == len(ids) - 1
            assert got == pytest.approx(expected, abs=BATCH_ATOL["float32"], rel=0)


def test_sampled_logprobs_are_of_the_raw_distribution():
    """Temperature changes which token is drawn, not the reported log-probability."""
    from loraq.generation.decode import SamplingParams, SequenceState, run_to_completion

    model = _two_adapter_model()
    hot = SequenceState([256, 1, 2], "b", SamplingParams(6, temperature=5.0, seed=1, logprobs=0))
    run_to_completion(model, [hot], pad_token_id=258)
    ref = _reference_logprobs(model, "b", hot.prompt_ids + hot.generated)
    for j, item in enumerate(hot.logprobs):
        pos = len(hot.prompt_ids) + j
        assert item.logprob == pytest.approx(ref[pos - 1, item.token].item(), abs=1e-4)
        assert item.top == ()
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(0)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(1, logprobs=-1)


def test_quantized_checkpoint_base_with_an_adapter(folders, tmp_path, capsys):
    """``--model`` a 4-bit folder written by loraq.save_quantized: loaded as stored (NF4)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraq.model.quantize import quantize_model

    base, a, _ = folders
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    quantize_model(model, loraq.LoraConfig(targets="all-linear", quant="nf4"))
    loraq.save_quantized(model, tmp_path / "nf4")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "nf4")
    text = tmp_path / "story.txt"
    text.write_text(TEXT)
    argv = ["eval", "--model", str(tmp_path / "nf4"), "--adapter", str(a)]
    assert cli.main([*argv, "--perplexity", str(text), "--max-length", "32", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    expected = perplexity(model, AutoTokenizer.from_pretrained(base), TEXT, 32)
    assert scores["base"]["story.txt"]["loglikelihood"] == pytest.approx(
        expected.loglikelihood, abs=1e-3
    )
    dense = perplexity(*_tiny(folders), TEXT, 32)
    assert abs(dense.loglikelihood - expected.loglikelihood) > 1e-2  # NF4 is not the dense base
    assert abs(scores["adapter"]["story.txt"]["loglikelihood"] - expected.loglikelihood) > 1e-2


# ----------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def live_server(folders):
    """``loraq serve``'s app (base + adapters a and b) on 127.0.0.1 in this process."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraq.serve.app import ServeSettings, create_app
    from loraq.serve.engine import Engine
    from loraq.serve.registry import AdapterRegistry
    from test_serve_hostile import LiveServer

    base, a, b = folders
    registry = AdapterRegistry(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    registry.add("a", a)
    registry.add("b", b)
    engine = Engine(registry, AutoTokenizer.from_pretrained(base), max_batch=8)
    srv = LiveServer(create_app(engine, ServeSettings(context_length=128, max_logprobs=5)))
    srv.engine = engine
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def reference_model(folders):
    from loraq.train.inference import load_with_adapters

    base, a, b = folders
    model, _ = load_with_adapters(str(base), {"a": str(a), "b": str(b)})
    return model


def _check_completion_logprobs(reference, adapter, logprobs: dict, ids: list[int], top: int):
    """token_logprobs (echoed prompt first) and top_logprobs against log_softmax(logits)."""
    tok = byte_tokenizer()
    ref = _reference_logprobs(reference, adapter, ids)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert len(logprobs["token_logprobs"]) >= len(ids)
    for pos in range(1, len(ids)):
        got = logprobs["token_logprobs"][pos]
        assert got == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-4)
        values, tokens = ref[pos - 1].topk(top)
        # keyed by token text, as OpenAI's format is: tokens with one text share an entry
        expected = {tok.decode([t]): v for t, v in zip(tokens.tolist(), values.tolist())}
        assert logprobs["top_logprobs"][pos] == pytest.approx(expected, abs=1e-4)
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_server_logprobs_equal_log_softmax_in_mixed_adapter_batches(live_server, reference_model):
    import concurrent.futures as cf

    prompts = {None: [256, 72, 105, 33, 10], "a": [256, 84, 104, 101], "b": [256, 1, 2, 3, 4, 5]}

    def ask(adapter):
        body = {"model": adapter or "base", "prompt": prompts[adapter], "max_tokens": 0}
        body |= {"echo": True, "logprobs": 3}
        with live_server.client() as client:
            return adapter, client.post("/v1/completions", json=body)

    with cf.ThreadPoolExecutor(6) as pool:  # every adapter at once, twice: shared batches
        answers = list(pool.map(ask, [None, "a", "b"] * 2))
    for adapter, response in answers:
        assert response.status_code == 200, response.text
        (choice,) = response.json()["choices"]
        assert choice["finish_reason"] == "length"
        ids = prompts[adapter]
        assert len(choice["logprobs"]["tokens"]) == len(ids)
        _check_completion_logprobs(reference_model, adapter, choice["logprobs"], ids, 3)


def test_server_generated_logprobs_prompt_lists_and_chat(live_server, reference_model):
    prompts = [[256, 40, 41, 42], [256, 50, 51]]
    body = {"model": "a", "prompt": prompts, "max_tokens": 3, "temperature": 0}
    with live_server.client() as client:
        answer = client.post("/v1/completions", json={**body, "echo": True, "logprobs": 2}).json()
        assert [c["index"] for c in answer["choices"]] == [0, 1]
        from loraq.generation.decode import generate_ids

        tok = byte_tokenizer()
        loraq.set_adapter(reference_model, "a")
        for ids, choice in zip(prompts, answer["choices"]):
            generated = generate_ids(reference_model, ids, 3, eos_token_id=257).tolist()
            assert choice["text"] == tok.decode(ids) + tok.decode(generated)
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(ids) + max(
                len(generated), 1 if len(generated) < 3 else 3
            )
            _check_completion_logprobs(reference_model, "a", lp, ids + generated, 2)
        # without echo: the generated tokens only, greedy (each the likeliest of its position)
        plain = client.post("/v1/completions", json={**body, "prompt": prompts[0], "logprobs": 1})
        lp = plain.json()["choices"][0]["logprobs"]
        assert all(v == max(t.values()) for v, t in zip(lp["token_logprobs"], lp["top_logprobs"]))
        chat = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        chat["temperature"] = 0
        reply = client.post(
            "/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 2}
        )
        content = reply.json()["choices"][0]["logprobs"]["content"]
        assert len(content) >= 1 and all(len(c["top_logprobs"]) == 2 for c in content)
        assert content[0]["logprob"] == pytest.approx(content[0]["top_logprobs"][0]["logprob"])
        too_many = client.post(
            "/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 6}
        )
        assert too_many.status_code == 400
        assert too_many.json()["error"]["param"] == "top_logprobs"
        assert "--max-logprobs" in too_many.json()["error"]["message"]


def test_lm_eval_local_completions_against_the_server(live_server, three_ways):
    """(c): lm-eval's own OpenAI-completions client, unmodified, scores the task through the
    server: the same per-item log-likelihoods as lm-eval's hf model with peft=a.

    ``add_bos_token=True``: lm-eval's API models encode without special tokens by default while
    its ``hf`` model uses the tokenizer's default, which here prepends ``<s>``; without it the
    client sends every prompt one token shorter and the two disagree by ~1e-2 per item (the
    server scores exactly the ids it is sent). Two concurrent requests of two prompts each put
    prompts of different lengths in one request and in one server batch."""
    pytest.importorskip("tenacity")  # lm-eval[api]: its API models need it
    from lm_eval.tasks import TaskManager

    _, theirs = three_ways
    base = theirs["a"]["config"]["model_args"]["pretrained"]
    result = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": live_server.url + "/v1/completions",
            "model": "a",
            "tokenizer": base,
            "tokenizer_backend": "huggingface",
            "num_concurrent": 2,
            "batch_size": 2,
            "add_bos_token": True,
            "max_retries": 1,
        },
        tasks=[TASK],
        limit=LIMIT,
        task_manager=TaskManager(include_path=str(EXAMPLES)),
        log_samples=True,
    )
    served = _item_loglikelihoods(result["samples"][TASK])
    ref = _item_loglikelihoods(theirs["a"]["samples"][TASK])
    for doc_id, values in ref.items():
        assert served[doc_id] == pytest.approx(values, abs=ATOL, rel=0)
    assert result["results"][TASK]["acc,none"] == theirs["a"]["results"][TASK]["acc,none"]


def test_lm_eval_completions_payload_and_parser_against_the_server(
    live_server, three_ways, folders
):
    """(c) on the wire, without lm-eval[api]'s extra packages: the request body lm-eval's
    ``local-completions`` sends for a log-likelihood (``echo``, ``max_tokens: 1``,
    ``logprobs: 1``, the prompt as token ids) and lm-eval's own parser of the reply give the
    per-item log-likelihoods and greediness of lm-eval's hf model with ``peft=a``."""
    from types import SimpleNamespace

    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from transformers import AutoTokenizer

    _, theirs = three_ways
    base = folders[0]
    encoder = HFLM(
        pretrained=str(base), tokenizer=AutoTokenizer.from_pretrained(base), device="cpu"
    )
    samples = theirs["a"]["samples"][TASK]
    with live_server.client() as client:
        for sample in samples:
            for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
                ctx, cont = encoder._encode_pair(context, continuation)
                payload = LocalCompletionsAPI._create_payload(
                    SimpleNamespace(model="a"), [ctx + cont], generate=False
                )
                reply = client.post("/v1/completions", json=payload)
                assert reply.status_code == 200, reply.text
                ((loglikelihood, greedy),) = LocalCompletionsAPI.parse_logprobs(
                    reply.json(), ctxlens=[len(ctx)]
                )
                assert loglikelihood == pytest.approx(resp[0][0], abs=ATOL, rel=0)
                assert greedy == resp[0][1]
