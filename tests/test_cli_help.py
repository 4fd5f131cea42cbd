"""``loraq <command> --help`` shows the defaults the code uses, read from the code, not typed."""

from __future__ import annotations

import argparse
import re

import pytest
import yaml

from loraq import cli


def help_text(command: str, capsys) -> str:
    assert cli.main([command, "--help"]) == 0
    return capsys.readouterr().out


def train_help_defaults(text: str) -> dict[str, str]:
    """``section.key -> printed default`` from the "Keys ..." part of ``loraq train --help``."""
    part = text.split("Keys, with the values used when a config file leaves them out:", 1)[1]
    part = part.split("\n\n", 1)[0]
    sections: dict[str, str] = {}
    current = None
    for line in part.splitlines():
        head = re.match(r"^  (\w+):\s+(.*)$", line)
        if head:
            current = head.group(1)
            sections[current] = head.group(2)
        elif current is not None and line.strip():
            sections[current] += " " + line.strip()
    printed = {}
    for section, body in sections.items():
        for item in re.split(r", (?=\w+=)", body.strip()):
            key, _, value = item.partition("=")
            printed[f"{section}.{key}"] = value
    return printed


def shown(value) -> str:
    """How ``describe_keys`` writes a value ('' for an empty string)."""
    return "" if value == "" else str(value)


def test_train_help_lists_every_key_with_the_default_a_config_file_gets(tmp_path, capsys):
    from loraq.train.config import load_config

    printed = train_help_defaults(help_text("train", capsys))
    # The defaults as the loader applies them: a config that names only what it must.
    path = tmp_path / "minimal.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"train": "d.jsonl"}}))
    actual = {
        f"{section}.{key}": value
        for section, values in load_config(path).to_dict().items()
        for key, value in values.items()
    }
    del actual["model.path"], actual["data.train"]  # required: no default
    assert printed.pop("model.path") == printed.pop("data.train") == ""
    assert set(printed) == set(actual)
    wrong = {k: (printed[k], shown(v)) for k, v in actual.items() if printed[k] != shown(v)}
    assert not wrong, f"--help shows (printed, actual): {wrong}"
    assert printed["lora.compute_dtype"] == "auto"  # once printed as float32 (issue 26)


def test_train_help_parser_reads_a_wrapped_listing():
    text = "Keys, with the values used when a config file leaves them out:\n"
    text += "  lora:     r=8, targets=all-linear,\n            quant=None\n\nmore"
    assert train_help_defaults(text) == {
        "lora.r": "8",
        "lora.targets": "all-linear",
        "lora.quant": "None",
    }


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def has_default(action: argparse.Action) -> bool:
    """An option whose default is a value a user would want to see."""
    d = action.default
    return bool(action.option_strings) and not (
        d is None or d is False or d is argparse.SUPPRESS or d == []
    )


@pytest.mark.parametrize("command", sorted(subcommand_parsers()))
def test_each_option_shows_its_real_default(command):
    parser = subcommand_parsers()[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = formatter._expand_help(action) if action.help else ""
        flat = " ".join(text.split())
        typed = re.findall(r"\(default: ([^)]*)\)", flat)
        if has_default(action):
            assert f"(default: {action.default})" in flat, (
                f"loraq {command} {action.option_strings[0]}: help {flat!r} does not show "
                f"its default {action.default!r}"
            )
        else:  # no value to show: any "(default: ...)" describes where it comes from
            for words in typed:
                assert not re.fullmatch(r"[-\d.e]+", words), (
                    f"loraq {command} {action.option_strings}: help names default {words} "
                    f"but the option's default is {action.default!r}"
                )


def test_a_typed_default_that_disagrees_is_caught():
    parser = argparse.ArgumentParser(formatter_class=cli.DefaultsHelpFormatter)
    shows = parser.add_argument("--port", type=int, default=8000, help="port")
    typed = parser.add_argument("--host", default="0.0.0.0", help="bind (default: 127.0.0.1)")
    formatter = parser._get_formatter()
    assert "(default: 8000)" in formatter._expand_help(shows)
    assert "(default: 0.0.0.0)" not in formatter._expand_help(typed)
