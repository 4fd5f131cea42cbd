"""``training.method: dpo``: preference pairs, the DPO / IPO math, and TRL's DPOTrainer as the
reference (same tiny Llama, same LoRA weights, data, lr and batch; float32 throughout)."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch

import loraq
from loraq.train import loop, preference
from loraq.train.config import ConfigError, load_config
from loraq.train.data import IGNORE_INDEX, collate
from loraq.train.metrics import read_metrics
from loraq.train.modeling import load_model, load_tokenizer
from loraq.train.preference_data import preference_example
from test_train_support import write_config
from tiny_lm import randomize_adapters, save_tiny_folder, single_thread  # noqa: F401

#: Pairs where the chosen answer follows the prompt's format (one word, lower case).
PAIRS = [
    {
        "prompt": "Answer in one word. Sky colour?",
        "chosen": " blue",
        "rejected": " The sky is Blue.",
    },
    {
        "prompt": "Answer in one word. Grass colour?",
        "chosen": " green",
        "rejected": " Green, mostly",
    },
    {"prompt": "Answer in one word. 2+2?", "chosen": " four", "rejected": " It is 4"},
    {"prompt": "Answer in one word. Snow colour?", "chosen": " white", "rejected": " WHITE!!"},
]
CHAT_PAIRS = [
    {
        "prompt": [{"role": "user", "content": p["prompt"]}],
        "chosen": [{"role": "assistant", "content": p["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": p["rejected"].strip()}],
    }
    for p in PAIRS
]
LR, BETA, STEPS = 1e-2, 0.1, 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("dpo") / "model")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def dpo_config(root, model_dir, rows=PAIRS, **training):
    root.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(root / "pairs.jsonl", rows)
    body = {
        "model": {"path": str(model_dir), "task": "causal-lm"},
        "data": {"train": str(data), "max_length": 64},
        "lora": {
            "r": 4,
            "alpha": 8,
            "dropout": 0.0,
            "targets": ["q_proj", "v_proj"],
            "compute_dtype": "float32",  # the CPU may run bf16 natively: compare in fp32
        },
        "training": {
            "method": "dpo",
            "batch_size": len(rows),  # the whole set per step: the order cannot matter
            "lr": LR,
            "schedule": "constant",
            "weight_decay": 0.0,
            "max_steps": STEPS,
            "beta": BETA,
            "eval_before": False,
            "output_dir": str(root / "run"),
            "progress": False,
            "num_threads": 1,
            **training,
        },
    }
    return load_config(write_config(root / "dpo.yaml", body))


# ----------------------------------------------------------------------------- the math
def test_sequence_logps_scores_only_labelled_next_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [1, 2, 3, 4, 5]])
    logps = torch.log_softmax(logits, -1)
    want0 = logps[0, 1, 3] + logps[0, 2, 4]
    want1 = sum(logps[1, t, labels[1, t + 1]] for t in range(4))
    got = preference.sequence_logps(logits, labels)
    torch.testing.assert_close(got, torch.stack([want0, want1]))
    assert preference.answer_lengths(labels).tolist() == [2, 4]


def test_losses_follow_their_formulas():
    chosen, rejected = torch.tensor([0.5, -1.0]), torch.tensor([0.1, 0.3])
    got = preference.preference_loss(chosen, rejected, 0.2, "sigmoid")
    want = torch.tensor([-math.log(1 / (1 + math.exp(-0.2 * d))) for d in (0.4, -1.3)])
    torch.testing.assert_close(got, want)
    n_c, n_r = torch.tensor([2, 4]), torch.tensor([1, 2])
    got = preference.preference_loss(chosen, rejected, 0.2, "ipo", n_c, n_r)
    want = torch.tensor([(0.25 - 0.1 - 2.5) ** 2, (-0.25 - 0.15 - 2.5) ** 2])
    torch.testing.assert_close(got, want)


def test_reward_metrics_are_means_over_pairs():
    sums = preference.RewardSums()
    out = preference.PairLosses(torch.ones(2), torch.tensor([0.3, -0.1]), torch.tensor([0.1, 0.2]))
    sums.add(out)
    sums.add(out, weight=0.0)  # a placeholder share counts as nothing
    m = sums.metrics()
    assert m["rewards/chosen"] == pytest.approx(0.1) and m["rewards/rejected"] == pytest.approx(
        0.15
    )
    assert m["rewards/margins"] == pytest.approx(-0.05)
    assert m["rewards/accuracies"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- data
def test_pairs_mask_the_prompt_and_end_in_eos(model_dir):
    tok = load_tokenizer(str(model_dir))
    ex = preference_example(PAIRS[0], tok, 64)
    prompt = tok(PAIRS[0]["prompt"])["input_ids"]
    for key in ("chosen", "rejected"):
        ids, labels = ex[key]["input_ids"], ex[key]["labels"]
        assert ids[: len(prompt)] == prompt and ids[-1] == tok.eos_token_id
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert labels[len(prompt) :] == ids[len(prompt) :]
    assert tok.decode(ex["chosen"]["input_ids"][len(prompt) : -1]) == " blue"
    batch = collate([ex, preference_example(PAIRS[1], tok, 64)], 258)
    assert batch["input_ids"].shape[0] == 4  # chosen, chosen, rejected, rejected
    assert batch["labels"][2].tolist()[: len(ex["rejected"]["labels"])] == ex["rejected"]["labels"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "a", "chosen": "b"}, r"record 1 has no 'rejected' field"),
        (
            {"prompt": "a", "chosen": "b", "rejected": "b"},
            r"record 1 field 'rejected' is identical",
        ),
        (
            {"prompt": "x" * 80, "chosen": "b", "rejected": "c"},
            r"record 1 field 'prompt' is 81 tok",
        ),
        (
            {"prompt": "a", "chosen": 3, "rejected": "c"},
            r"record 1 field 'chosen' must be a string",
        ),
        (  # the answers differ only past max_length (64): truncated, they are one answer
            {"prompt": "a", "chosen": "b" * 70 + "c", "rejected": "b" * 70 + "d"},
            r"record 1 field 'rejected' equals 'chosen' within data.max_length=64",
        ),
        (
            {**CHAT_PAIRS[0], "rejected": [{"role": "assistant"}]},
            r"record 1 field 'rejected' message 1 needs a string 'content', got none",
        ),
        (
            {**CHAT_PAIRS[0], "chosen": [{"role": 1, "content": "x"}]},
            r"record 1 field 'chosen' message 1 needs a string 'role', got 1",
        ),
        (
            {**CHAT_PAIRS[0], "prompt": ["Sky colour?"]},
            r"record 1 field 'prompt' message 1 must be an object with 'role' and 'content'",
        ),
        (
            {**CHAT_PAIRS[0], "chosen": []},
            r"record 1 field 'chosen' is an empty list of chat messages",
        ),
        (
            {**CHAT_PAIRS[0], "rejected": "blue"},
            r"record 1 field 'rejected' must be a list of chat messages",
        ),
    ],
)
def test_bad_records_get_one_line_naming_record_and_field(tmp_path, model_dir, record, message):
    cfg = dpo_config(tmp_path, model_dir, rows=[PAIRS[0], record])
    cfg.data.max_train_samples = None
    tok = load_tokenizer(str(model_dir))
    bad = write_jsonl(tmp_path / "bad.jsonl", [record])
    cfg.data.train = str(bad)
    with pytest.raises(ConfigError, match=message) as err:
        loop.load_datasets(cfg, tok, loop.tokenize_pairs)
    assert "\n" not in str(err.value) and "bad.jsonl" in str(err.value)


def test_a_chat_template_that_refuses_a_record_is_named(model_dir):
    """A template's own check (jinja's raise_exception, as in many chat templates) becomes one
    line naming the record and field."""
    tok = load_tokenizer(str(model_dir))
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(ConfigError) as err:
        preference_example(CHAT_PAIRS[0], tok, 64, "pairs.jsonl record 3")
    assert str(err.value) == (
        "pairs.jsonl record 3 field 'prompt': the chat template refused it: "
        "Conversation roles must alternate"
    )


def test_dpo_config_is_checked(tmp_path, model_dir):
    with pytest.raises(ConfigError, match="training.beta must be > 0"):
        dpo_config(tmp_path, model_dir, beta=0.0)
    with pytest.raises(ConfigError, match="training.loss_type: expected one of"):
        dpo_config(tmp_path, model_dir, loss_type="hinge")


# ----------------------------------------------------------------------------- against TRL
def _trl_trainer(root, model_dir, adapter_dir, rows, loss_type):
    """TRL's DPOTrainer creating a fresh PEFT LoRA adapter (so its reference is the model with
    the adapter disabled, as ours), then loading our saved adapter's weights into it."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    args = DPOConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=len(rows), learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=STEPS, logging_steps=1, beta=BETA, loss_type=[loss_type], max_length=64,
        bf16=False, fp16=False, use_cpu=True, report_to="none", save_strategy="no",
        gradient_checkpointing=False, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            model=base, args=args, train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer, peft_config=lora,
        )  # fmt: skip
    assert list(trainer.model.peft_config) == ["default"]  # no "ref" copy: adapters off it is
    result = set_peft_model_state_dict(
        trainer.model, load_file(str(adapter_dir / "adapter_model.safetensors"))
    )
    assert not result.unexpected_keys
    return trainer


def _adapter_grads(model, strip=""):
    return {
        n.removeprefix(strip): p.grad.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def assert_steps_equal_trl(session, trainer, keys, steps: int) -> None:
    """``steps`` of our training equal the steps TRL's ``trainer`` logged (loss and the metrics
    ``keys``), and our trainable adapter weights then equal TRL's."""
    logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert len(logs) == steps
    for step in range(steps):
        stats = loop.train_step(session)
        for key in keys:
            assert stats.rewards[key] == pytest.approx(logs[step][key], abs=1e-5), (step, key)
        assert stats.loss == pytest.approx(logs[step]["loss"], abs=1e-4)
    theirs = {n.removeprefix("base_model.model."): p for n, p in trainer.model.named_parameters()}
    for name, param in session.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, theirs[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_equals_trl_dpo_trainer(tmp_path, model_dir, loss_type):
    """The first batch's loss, rewards and adapter gradients, then the adapter after 3 steps
    and every step's rewards, equal TRL's DPOTrainer + PEFT LoRA (float32, one thread)."""
    cfg = dpo_config(tmp_path, model_dir, loss_type=loss_type)
    session = loop.setup(cfg, log=lambda line: None)
    torch.manual_seed(1)
    randomize_adapters(session.model)  # a fresh B = 0 adapter would make policy == reference
    loraq.save_adapter(session.model, tmp_path / "start")
    trainer = _trl_trainer(tmp_path, model_dir, tmp_path / "start", PAIRS, loss_type)

    # One batch by hand: loss, rewards and gradients.
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    ours = preference.pair_losses(
        session.model, collate(session.data.train, session.data.pad_id), BETA, loss_type
    )
    ours.losses.mean().backward()
    torch.testing.assert_close(ours.losses.mean(), trl_loss, rtol=1e-5, atol=1e-6)
    assert ours.chosen_rewards.mean().item() == pytest.approx(
        trl_metrics["rewards/chosen"], abs=1e-6
    )
    assert ours.rejected_rewards.mean().item() == pytest.approx(
        trl_metrics["rewards/rejected"], abs=1e-6
    )
    theirs = _adapter_grads(trainer.model, "base_model.model.")
    mine = _adapter_grads(session.model)
    assert set(mine) == set(theirs) and len(mine) == 8
    for name, grad in mine.items():
        torch.testing.assert_close(grad, theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    trainer.model.zero_grad(set_to_none=True)
    session.optimizer.zero_grad(set_to_none=True)

    # Three optimizer steps each.
    trainer._metrics["train"].clear()
    trainer.train()
    assert_steps_equal_trl(session, trainer, preference.REWARD_KEYS, STEPS)


def test_chat_pairs_tokenize_as_trl(tmp_path, model_dir):
    """Chat-message records: our ids and answer masks equal those of TRL's own tokenization."""
    cfg = dpo_config(tmp_path, model_dir, rows=CHAT_PAIRS)
    tok = load_tokenizer(str(model_dir))
    loraq.save_adapter(loraq.apply(load_model(str(model_dir), "causal-lm", None, 258)[0],
                                   cfg.lora), tmp_path / "start")  # fmt: skip
    trainer = _trl_trainer(tmp_path, model_dir, tmp_path / "start", CHAT_PAIRS, "sigmoid")
    for i, record in enumerate(CHAT_PAIRS):
        ex = preference_example(record, tok, 128)  # TRL's rows are not yet truncated
        row = trainer.train_dataset[i]
        for key in ("chosen", "rejected"):
            assert ex[key]["input_ids"] == row["prompt_ids"] + row[f"{key}_ids"]
            n = len(row["prompt_ids"])
            assert ex[key]["labels"] == [IGNORE_INDEX] * n + row[f"{key}_ids"]


# ----------------------------------------------------------------------------- the run
def test_dpo_run_logs_rewards_learns_and_resumes_exactly(tmp_path, model_dir):
    """A run writes rewards to metrics.jsonl and the plot, prefers the chosen answers by the
    end, and 2 steps + resume for 2 equal 4 steps straight."""
    straight = dpo_config(tmp_path / "a", model_dir, max_steps=4, lr=5e-2)
    result = loop.train(straight, log=lambda line: None)
    lines = [r for r in read_metrics(tmp_path / "a" / "run" / "metrics.jsonl") if "loss" in r]
    assert len(lines) == 4 and all(set(preference.REWARD_KEYS) <= set(r) for r in lines)
    assert lines[-1]["rewards/margins"] > lines[0]["rewards/margins"]
    assert lines[-1]["rewards/accuracies"] == 1.0
    assert (tmp_path / "a" / "run" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "a" / "run" / "loss.png").is_file()

    first = dpo_config(tmp_path / "b", model_dir, max_steps=4, lr=5e-2, save_every=2)

    def stop_at_2(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loop.train(first, on_step=stop_at_2, log=lambda line: None)
    again = dpo_config(tmp_path / "b", model_dir, max_steps=4, lr=5e-2, save_every=2, resume=True)
    resumed = loop.train(again, log=lambda line: None)
    assert resumed.losses == pytest.approx(result.losses[2:], rel=1e-6, abs=1e-7)
    lines_b = [r for r in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl") if "loss" in r]
    for a, b in zip(lines, lines_b, strict=True):
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("quant", ["nf4", "int8", "q8_0", "q4_0"])
def test_dpo_over_quantized_bases_uses_that_base_as_reference(tmp_path, model_dir, quant):
    """Over a quantized base (bitsandbytes-style NF4 / int8, GGUF blocks) a fresh adapter's
    first loss is exactly log 2: the reference is the same quantized model with adapters off
    (a dense reference would differ); then the margin grows."""
    cfg = dpo_config(tmp_path, model_dir, max_steps=2, lr=5e-2)
    cfg.lora = dataclasses.replace(cfg.lora, quant=quant)
    said = []
    result = loop.train(cfg, log=said.append)
    assert any(f"{quant} base" in line for line in said)
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    lines = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert lines[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-7)
    assert lines[1]["rewards/margins"] > 0 and result.losses[1] < math.log(2)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_follow_one_process_with_the_global_batch(tmp_path, model_dir, strategy):
    """torchrun, 2 CPU ranks (gloo) with 2 pairs each: the losses and rewards of one process
    with all 4 pairs per step."""
    from test_distributed import WORKER, run_ranks

    one = dpo_config(tmp_path / "one", model_dir, lr=5e-2)
    loop.train(one, log=lambda line: None)
    dpo_config(tmp_path / "two", model_dir, lr=5e-2, batch_size=2, distributed=strategy)
    code, out, err = run_ranks(str(WORKER), str(tmp_path / "two" / "dpo.yaml"))
    assert code == 0, err[-3000:]
    assert f"distributed: {strategy} over 2 ranks" in out + err
    want = [r for r in read_metrics(tmp_path / "one" / "run" / "metrics.jsonl") if "loss" in r]
    got = [r for r in read_metrics(tmp_path / "two" / "run" / "metrics.jsonl") if "loss" in r]
    assert len(got) == len(want) == STEPS
    for a, b in zip(want, got, strict=True):
        for key in ("loss", *preference.REWARD_KEYS):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def test_eval_set_gets_the_dpo_loss_and_rewards(tmp_path, model_dir):
    """An eval set of pairs is scored by the DPO loss (log 2 before training: the policy is the
    reference) and the reward means, as ``eval_...`` lines in metrics.jsonl."""
    cfg = dpo_config(tmp_path, model_dir, max_steps=2, lr=5e-2, eval_before=True)
    cfg.data.eval = cfg.data.train
    result = loop.train(cfg, log=lambda line: None)
    assert result.eval_before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.eval_after["eval_loss"] < math.log(2)
    assert result.eval_after["eval_rewards/margins"] > 0
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert set(evals[-1]) >= {"eval_" + k for k in preference.REWARD_KEYS}


def test_cli_names_the_bad_record_in_one_line(tmp_path, model_dir, capsys):
    from loraq import cli

    dpo_config(tmp_path, model_dir, rows=[PAIRS[0], PAIRS[1], {"prompt": "a", "chosen": "b"}])
    assert cli.main(["train", str(tmp_path / "dpo.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loraq train: error: ") and "\n" not in err
    assert "pairs.jsonl record 3 has no 'rejected' field" in err
