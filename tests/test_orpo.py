"""``training.method: orpo``: the odds-ratio math, TRL's ORPOTrainer (``trl.experimental.orpo``)
as the reference on the same tiny Llama, LoRA weights, pairs, lr and batch (float32), and the
run's metrics."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import loraq
from loraq.train import loop, preference
from loraq.train.config import ConfigError
from loraq.train.data import collate
from loraq.train.metrics import read_metrics
from loraq.train.modeling import load_tokenizer
from loraq.train.preference_data import preference_example
from test_dpo import PAIRS, _adapter_grads, assert_steps_equal_trl, dpo_config
from tiny_lm import randomize_adapters, save_tiny_folder, single_thread  # noqa: F401

LR, BETA, STEPS = 1e-2, 0.1, 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("orpo") / "model")


def orpo_config(root, model_dir, rows=PAIRS, **training):
    return dpo_config(root, model_dir, rows, **{"method": "orpo", "beta": BETA, **training})


# ----------------------------------------------------------------------------- the math
def test_odds_ratio_follows_the_papers_formula():
    """log odds = log(p_c / (1 - p_c)) - log(p_r / (1 - p_r)) on per-token mean log-probs,
    written here from the paper (Hong et al. 2024, eqs. 4-7) in float64."""
    chosen = torch.tensor([-0.2, -3.0, -1e-4], dtype=torch.float64)
    rejected = torch.tensor([-1.5, -0.1, -20.0], dtype=torch.float64)
    losses, log_odds = preference.odds_ratio_loss(chosen, rejected, 0.25)
    p_c, p_r = chosen.exp(), rejected.exp()
    want = torch.log(p_c / (1 - p_c)) - torch.log(p_r / (1 - p_r))
    torch.testing.assert_close(log_odds, want)
    torch.testing.assert_close(losses, -0.25 * torch.log(torch.sigmoid(want)))
    tiny = torch.tensor([-1e-9, -50.0], dtype=torch.float64)  # both sides of -log 2, far out
    torch.testing.assert_close(preference.log1mexp(tiny), torch.log(-torch.expm1(tiny)))


def test_orpo_loss_equals_a_pure_pytorch_reference(tmp_path, model_dir):
    """Our per-pair losses against the formula written out here: token-mean NLL of the chosen
    rows (prompt and answer) plus beta x -log sigmoid(log odds) of per-token mean log-probs."""
    cfg = orpo_config(tmp_path, model_dir)
    session = loop.setup(cfg, log=lambda line: None)
    torch.manual_seed(1)
    randomize_adapters(session.model)
    batch = collate(session.data.train, session.data.pad_id)
    out = preference.pair_losses(session.model, batch, BETA, "sigmoid", "orpo")
    with torch.no_grad():
        logits = session.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    n = len(PAIRS)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    nll = F.cross_entropy(  # the chosen rows, every real token after the first
        logits[:n, :-1].reshape(-1, logits.shape[-1]),
        ids[:n, 1:].masked_fill(mask[:n, 1:] == 0, -100).reshape(-1),
    )
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    answer = labels[:, 1:] != -100
    avg = (logp * answer).sum(-1) / answer.sum(-1)
    p_c, p_r = avg[:n].exp(), avg[n:].exp()
    log_odds = torch.log(p_c / (1 - p_c)) - torch.log(p_r / (1 - p_r))
    want = nll - BETA * F.logsigmoid(log_odds).mean()
    torch.testing.assert_close(out.losses.mean(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.extras["nll_loss"].mean(), nll, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.extras["log_odds_chosen"], log_odds, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.chosen_rewards, BETA * avg[:n], rtol=1e-5, atol=1e-7)


def test_orpo_config_is_checked(tmp_path, model_dir):
    with pytest.raises(ConfigError, match="training.loss_type applies to training.method 'dpo'"):
        orpo_config(tmp_path, model_dir, loss_type="ipo")
    with pytest.raises(ConfigError, match="training.beta must be > 0"):
        orpo_config(tmp_path, model_dir, beta=-1.0)


# ----------------------------------------------------------------------------- against TRL
def _trl_orpo(root, model_dir, adapter_dir, rows):
    """TRL's ORPOTrainer with a fresh PEFT LoRA adapter, then our saved adapter's weights."""
    pytest.importorskip("trl")
    orpo = pytest.importorskip("trl.experimental.orpo")
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    args = orpo.ORPOConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=len(rows), learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=STEPS, logging_steps=1, beta=BETA, max_length=64, bf16=False, fp16=False,
        use_cpu=True, report_to="none", save_strategy="no", gradient_checkpointing=False,
        seed=0, dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = orpo.ORPOTrainer(
            model=base, args=args, train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer, peft_config=lora,
        )  # fmt: skip
    result = set_peft_model_state_dict(
        trainer.model, load_file(str(adapter_dir / "adapter_model.safetensors"))
    )
    assert not result.unexpected_keys
    return trainer


def test_pairs_tokenize_as_trl_orpo(tmp_path, model_dir):
    """Our ids and answer masks equal those ORPOTrainer builds from the same text records."""
    cfg = orpo_config(tmp_path, model_dir)
    session = loop.setup(cfg, log=lambda line: None)
    loraq.save_adapter(session.model, tmp_path / "start")
    trainer = _trl_orpo(tmp_path, model_dir, tmp_path / "start", PAIRS)
    tok = load_tokenizer(str(model_dir))
    for i, record in enumerate(PAIRS):
        ex = preference_example(record, tok, 64)
        row = trainer.train_dataset[i]
        for key in ("chosen", "rejected"):
            assert ex[key]["input_ids"] == row[f"{key}_input_ids"]
            assert ex[key]["labels"] == row[f"{key}_labels"]


def test_equals_trl_orpo_trainer(tmp_path, model_dir):
    """The first batch's loss, NLL, rewards, log odds and adapter gradients, then every step's
    loss and rewards and the adapter after 3 steps, equal TRL's ORPOTrainer + PEFT LoRA
    (float32, compute_dtype float32, one thread)."""
    cfg = orpo_config(tmp_path, model_dir)
    assert cfg.lora.compute_dtype == "float32"
    session = loop.setup(cfg, log=lambda line: None)
    torch.manual_seed(1)
    randomize_adapters(session.model)
    loraq.save_adapter(session.model, tmp_path / "start")
    trainer = _trl_orpo(tmp_path, model_dir, tmp_path / "start", PAIRS)

    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    ours = preference.pair_losses(
        session.model, collate(session.data.train, session.data.pad_id), BETA, "sigmoid", "orpo"
    )
    ours.losses.mean().backward()
    torch.testing.assert_close(ours.losses.mean(), trl_loss, rtol=1e-5, atol=1e-6)
    sums = preference.RewardSums()
    sums.add(ours)
    mine = sums.metrics()
    for key in (*preference.REWARD_KEYS, *preference.ORPO_KEYS):
        assert mine[key] == pytest.approx(trl_metrics[key], abs=1e-5), key
    theirs = _adapter_grads(trainer.model, "base_model.model.")
    grads = _adapter_grads(session.model)
    assert set(grads) == set(theirs) and len(grads) == 8
    for name, grad in grads.items():
        torch.testing.assert_close(grad, theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    trainer.model.zero_grad(set_to_none=True)
    session.optimizer.zero_grad(set_to_none=True)

    trainer._stored_metrics.clear()
    trainer.train()
    assert_steps_equal_trl(
        session, trainer, (*preference.REWARD_KEYS, *preference.ORPO_KEYS), STEPS
    )


# ----------------------------------------------------------------------------- the run
def test_orpo_run_logs_rewards_and_log_odds_and_learns(tmp_path, model_dir):
    """metrics.jsonl carries the rewards and ORPO's metrics on train and eval lines, the plot
    is drawn, and the chosen answers win by the end."""
    cfg = orpo_config(tmp_path, model_dir, max_steps=4, lr=5e-2, eval_before=True)
    cfg.data.eval = cfg.data.train
    result = loop.train(cfg, log=lambda line: None)
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in lines if "loss" in r]
    keys = {*preference.REWARD_KEYS, *preference.ORPO_KEYS}
    assert len(train) == 4 and all(keys <= set(r) for r in train)
    assert train[-1]["log_odds_chosen"] > train[0]["log_odds_chosen"]
    assert train[-1]["rewards/accuracies"] == 1.0
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4]
    assert {"eval_" + k for k in keys} <= set(evals[-1])
    assert result.eval_after["eval_loss"] < result.eval_before["eval_loss"]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "loss.png").is_file()


def test_orpo_with_grad_accum_equals_the_mean_of_its_micro_batches(tmp_path, model_dir):
    """Two micro-batches of 2 pairs: the step's loss is the mean of the two micro-batches'
    ORPO losses (each a token mean, as TRL's accumulation), not one token mean over all 4."""
    cfg = orpo_config(tmp_path, model_dir, batch_size=2, grad_accum=2, max_steps=1)
    session = loop.setup(cfg, log=lambda line: None)
    torch.manual_seed(1)
    randomize_adapters(session.model)
    order = loop.micro_batches(session.data.train, 2, cfg.training.seed, session.data.pad_id)
    want = []
    with torch.no_grad():
        for _ in range(2):
            micro = next(order)
            want.append(
                preference.pair_losses(session.model, micro.batch, BETA, "sigmoid", "orpo")
                .losses.mean()
                .item()
            )
    stats = loop.train_step(session)
    assert stats.loss == pytest.approx(sum(want) / 2, rel=1e-5)
    assert math.isfinite(stats.rewards["nll_loss"])


def test_two_ranks_follow_one_process_with_the_global_batch(tmp_path, model_dir):
    """torchrun, 2 CPU ranks (DDP, gloo) with 2 pairs each: the losses, rewards and NLL of one
    process with all 4 pairs per step (the NLL's token mean spans both ranks' tokens)."""
    from test_distributed import WORKER, run_ranks

    one = orpo_config(tmp_path / "one", model_dir, lr=5e-2)
    loop.train(one, log=lambda line: None)
    orpo_config(tmp_path / "two", model_dir, lr=5e-2, batch_size=2, distributed="ddp")
    code, out, err = run_ranks(str(WORKER), str(tmp_path / "two" / "dpo.yaml"))
    assert code == 0, err[-3000:]
    want = [r for r in read_metrics(tmp_path / "one" / "run" / "metrics.jsonl") if "loss" in r]
    got = [r for r in read_metrics(tmp_path / "two" / "run" / "metrics.jsonl") if "loss" in r]
    assert len(got) == len(want) == STEPS
    for a, b in zip(want, got, strict=True):
        for key in ("loss", *preference.REWARD_KEYS, *preference.ORPO_KEYS):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def test_smollm2_example_configs_load():
    """examples/smollm2_{dpo,orpo}.yaml: valid configs over the same shipped pairs."""
    from pathlib import Path

    from loraq.train.config import load_config

    examples = Path(__file__).resolve().parents[1] / "examples"
    for method in ("dpo", "orpo"):
        cfg = load_config(examples / f"smollm2_{method}.yaml")
        assert cfg.training.method == method
        assert Path(cfg.data.train).is_file() and Path(cfg.data.eval).is_file()
