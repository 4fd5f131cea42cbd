"""README.md is a contract: every fenced block says how it is checked, and the run-in-CI ones run.

Each fenced block in README.md is preceded by one mark line:

- ``<!-- ci -->``: run here, on tiny inputs (placeholders such as ``my.yaml`` or
  ``path/to/local/model`` are replaced by the fixture models below), so a renamed flag,
  config key or function fails this file;
- ``<!-- by-hand: REASON -->``: needs what CI has not got (a GPU, llama.cpp, minutes of
  training, several processes, a download); REASON says which;
- ``<!-- illustrative -->``: not a runnable example (a file tree, a sketch).

Shell blocks run line by line: ``loraq ...`` through :func:`loraq.cli.main` in this process
(what the ``loraq`` console script calls, minus the start-up cost of a new interpreter per
line) with a bounded time each; ``pip install -e ".[EXTRA]"`` is checked against pyproject's
extras. Every ``loraq`` line of every shell block, by-hand ones included, must also get past
the argument parser and the config key check. Python blocks run statement by statement in a namespace holding the names the README
assumes (``model``, ``tokenizer``, ...), in a temporary working folder.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import pattern_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = re.compile(r"^<!-- (ci|by-hand: \S.*|illustrative) -->$")
FENCE = re.compile(r"^```(\S*)\s*$")
#: Seconds one README command or statement may take on the tiny fixtures.
STEP_TIMEOUT_S = 60


@dataclass(frozen=True)
class Block:
    """One fenced block of README.md."""

    line: int  # 1-based line of the opening fence
    lang: str
    mark: str  # "ci", "by-hand: reason", "illustrative", or "" when unmarked
    code: str

    @property
    def id(self) -> str:
        first = next((s for s in self.code.splitlines() if s.strip()), "")
        return f"{self.lang}:{first.strip()[:40]}"


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text with the mark line before each (if any)."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"README.md:{i + 1}: fence never closed"
        before = next((s.strip() for s in reversed(lines[:i]) if s.strip()), "")
        mark = MARK.match(before)
        code = "\n".join(lines[i + 1 : end])
        blocks.append(Block(i + 1, opening.group(1), mark.group(1) if mark else "", code))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
CI_BLOCKS = [b for b in BLOCKS if b.mark == "ci"]


def test_every_fenced_block_is_marked():
    unmarked = [f"README.md:{b.line} ({b.id})" for b in BLOCKS if not b.mark]
    assert not unmarked, (
        "mark each block with <!-- ci -->, <!-- by-hand: REASON --> or <!-- illustrative -->: "
        + ", ".join(unmarked)
    )
    assert CI_BLOCKS, "no README block runs in CI"
    for b in CI_BLOCKS:
        assert b.lang in ("bash", "python"), f"README.md:{b.line}: a ci block is bash or python"


def test_marks_are_read_and_unmarked_blocks_found():
    text = "x\n<!-- ci -->\n```bash\nloraq train\n```\n\n```python\npass\n```\n"
    text += "<!-- by-hand: needs a GPU -->\n\n```bash\nnvidia-smi\n```\n"
    blocks = readme_blocks(text)
    assert [(b.lang, b.mark, b.code) for b in blocks] == [
        ("bash", "ci", "loraq train"),
        ("python", "", "pass"),
        ("bash", "by-hand: needs a GPU", "nvidia-smi"),
    ]
    assert not MARK.match("<!-- by-hand: -->")  # a by-hand mark gives its reason


# ============================================================================ fixtures
class StepTimeout(Exception):
    """A README command or statement ran past :data:`STEP_TIMEOUT_S`."""


@contextlib.contextmanager
def time_limit(what: str, seconds: int = STEP_TIMEOUT_S):
    """Raise :class:`StepTimeout` in this (main) thread when ``what`` runs past ``seconds``."""

    def expire(signum, frame):
        raise StepTimeout(f"{what!r} ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, llama_dir, bert_dir):
    """Tiny models standing in for the README's placeholders, and a config over the Llama."""
    root = tmp_path_factory.mktemp("readme_fixtures")
    config = pattern_config(root, llama_dir, save_every=1, output_dir="runs/lm")
    eval_tsv = root / "sentiment_eval.tsv"  # the README's eval file, its first 16 rows
    head = (ROOT / "examples" / "sentiment_eval.tsv").read_text(encoding="utf-8").splitlines()
    eval_tsv.write_text("\n".join(head[:17]) + "\n", encoding="utf-8")
    story = root / "story.txt"
    story.write_text("Once upon a time a small robot learned to read. " * 40, encoding="utf-8")
    return {
        "story": str(story),
        "llama": str(llama_dir),
        "bert": str(bert_dir),
        "config": str(config),
        "eval_tsv": str(eval_tsv),
    }


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working folder with the repository's ``examples/`` in it (as in a clone)."""
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ============================================================================ shell blocks
#: README placeholder words -> fixture words ("{name}" is a key of the ``fixtures`` fixture).
#: Run folders are relative: the commands run in one working folder, in README order, so
#: ``runs/default/adapter`` is what the bare ``loraq train`` line wrote there.
PLACEHOLDERS = {
    "my.yaml": "{config}",
    "runs/x/adapter": "runs/lm/adapter",
    "a=DIR": "a=runs/lm/adapter",
    "b=DIR": "b=runs/lm/adapter",
    "DIR": "{llama}",
    "models/llama": "{llama}",
    "support=out/support": "support=runs/lm/adapter",
    "adapters/": "runs/",
    "examples/sentiment_eval.tsv": "{eval_tsv}",
    "story.txt": "{story}",
}
#: Words added to a command so that it runs in seconds on the fixtures.
TINY_RUN = {
    "train": ["--training.max_steps", "1", "--training.progress", "false"],
    "generate": ["--max-new-tokens", "4"],
}
#: The built-in default (no CONFIG) on the tiny BERT instead of the real MiniLM.
BUILT_IN_TINY = ["--model.path", "{bert}", "--data.max_train_samples", "32"]
BUILT_IN_TINY += ["--data.max_eval_samples", "16"]
#: Commands whose command line is parsed (flags, choices), not run: ``serve`` runs until
#: stopped; ``compare`` starts a process per method (tests/test_compare.py runs it).
PARSE_ONLY = {"serve", "compare"}
#: Flags that make a command parse-only: lm-evaluation-harness runs take tens of seconds
#: (tests/test_eval_harness.py runs them).
PARSE_ONLY_WITH = {"--tasks"}


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block as argv lists: continuations joined, comments dropped,
    ``a && b`` / ``a; b`` split, leading ``NAME=value`` environment words dropped."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        argv: list[str] = []
        words = []
        for word in shlex.split(line, comments=True):  # "a;" is the word a, then a separator
            words += [word[:-1], ";"] if word.endswith(";") and word != ";" else [word]
        for word in [*words, "&&"]:
            if word in ("&&", ";"):
                while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
                    argv.pop(0)
                if argv:
                    commands.append(argv)
                argv = []
            else:
                argv.append(word)
    return commands


def test_shell_commands_are_split_like_a_shell():
    code = "A=1 loraq x --k 'a b'  # note\npip install -e \".[dev]\" && B=2 loraq y \\\n  --z; ls"
    assert shell_commands(code) == [
        ["loraq", "x", "--k", "a b"],
        ["pip", "install", "-e", ".[dev]"],
        ["loraq", "y", "--z"],
        ["ls"],
    ]


def tiny_argv(argv: list[str], fx: dict) -> list[str]:
    """A ``loraq`` command's arguments with placeholders replaced and the tiny-run words added."""
    words = [PLACEHOLDERS.get(w, w).format(**fx) for w in argv[1:]]
    command = words[0]
    extra = list(TINY_RUN.get(command, []))
    if command == "train" and (len(words) == 1 or words[1].startswith("-")):
        extra += [w.format(**fx) for w in BUILT_IN_TINY]
    return words + extra


def run_loraq(argv: list[str], fx: dict, capsys) -> None:
    from loraq import cli

    words = tiny_argv(argv, fx)
    shown = shlex.join(argv)
    if words[0] in PARSE_ONLY or PARSE_ONLY_WITH & set(words):
        try:
            cli.build_parser().parse_args(words)
        except SystemExit as exc:
            pytest.fail(f"{shown}: rejected by the argument parser: {capsys.readouterr().err}")
            raise AssertionError from exc
        return
    with time_limit(shown):
        code = cli.main(words)
    out = capsys.readouterr()
    assert code == 0, (
        f"{shown} (run as loraq {shlex.join(words)}) exited {code}:\n{out.err[-2000:]}"
    )


def pyproject_extras() -> set[str]:
    """The names in pyproject.toml's ``[project.optional-dependencies]`` (no tomllib on 3.10)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*=", section, flags=re.M))


def check_pip_install(argv: list[str]) -> None:
    """``pip install -e ".[extra]"`` names an extra of pyproject.toml; other installs are not
    the README's business in CI (``.ci/run`` installs what the tests need)."""
    extras = pyproject_extras()
    for word in argv[2:]:
        spec = re.fullmatch(r"\.\[([\w,-]+)\]", word)
        if spec:
            assert "-e" in argv, f"{' '.join(argv)}: install a clone editable (pip install -e)"
            missing = set(spec.group(1).split(",")) - set(extras)
            assert not missing, f"{' '.join(argv)}: no such extra {sorted(missing)}"
        assert not re.fullmatch(r"loraq\[.*\]", word), "loraq is not on PyPI: install the clone"


SHELL_CI = [b for b in CI_BLOCKS if b.lang == "bash"]


@pytest.mark.parametrize("block", SHELL_CI, ids=[b.id for b in SHELL_CI])
def test_readme_shell_block_runs(block, fixtures, workdir, capsys):
    for argv in shell_commands(block.code):
        if argv[0] == "loraq":
            run_loraq(argv, fixtures, capsys)
        elif argv[:2] == ["pip", "install"]:
            check_pip_install(argv)
        else:
            pytest.fail(f"README.md:{block.line}: {argv[0]!r} cannot run in CI; mark it by-hand")


def test_a_renamed_flag_fails(fixtures, workdir, capsys):
    """The check bites: a flag the command line does not know is a failure, not a skip."""
    with pytest.raises(AssertionError, match="exited 2"):
        run_loraq(["loraq", "inspect", "runs/x/adapter", "--jsn"], fixtures, capsys)
    with pytest.raises(pytest.fail.Exception, match="rejected"):
        run_loraq(["loraq", "serve", "--base", "DIR", "--adaptr", "a=DIR"], fixtures, capsys)
    with pytest.raises(AssertionError, match="no such extra"):
        check_pip_install(["pip", "install", "-e", ".[ggfu]"])
    with pytest.raises(AssertionError, match="not on PyPI"):
        check_pip_install(["pip", "install", "loraq[gguf]"])


# ============================================================================ Python blocks
#: Words of the README's Python snippets -> fixtures (``{name}`` is a key of ``fixtures``).
PY_PLACEHOLDERS = {
    '"path/to/local/model"': '"{llama}"',
    '"SmolLM2-135M-Instruct.Q4_1.gguf"': '"{gguf}"',
    "loftq_iters=5": "loftq_iters=1",
}
#: What a snippet takes as already done, by a word it contains (run before it, in its namespace).
PY_SETUP = {
    "loraq.adapter_rows": (
        "loraq.apply(model, cfg_a, adapter_name='a'); loraq.apply(model, cfg_b, adapter_name='b')"
    ),
}
INPUT_IDS = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16], [3, 4, 5, 6, 7, 8], [9, 8, 7, 6, 5, 4]]


def snippet_namespace(code: str, fx: dict) -> dict:
    """The names README snippets use without defining them: a fresh tiny Llama ``model``, its
    ``tokenizer``, ``input_ids``, ``prompts``, two adapter configs and the original weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import loraq

    model = AutoModelForCausalLM.from_pretrained(fx["llama"]).eval()
    ns = {
        "loraq": loraq,
        "torch": torch,
        "model": model,
        "tokenizer": AutoTokenizer.from_pretrained(fx["llama"]),
        "input_ids": torch.tensor(INPUT_IDS),
        "prompts": ["abc:", "hello", "xyz"],
        "cfg_a": loraq.LoraConfig(r=4, alpha=8, compute_dtype="float32"),
        "cfg_b": loraq.LoraConfig(r=8, alpha=8, compute_dtype="float32"),
        "w": {k: v.clone() for k, v in model.state_dict().items()},
    }
    for word, setup in PY_SETUP.items():
        if word in code:
            exec(setup, ns)
    return ns


def snippet_source(code: str, fx: dict) -> str:
    for word, fixture in PY_PLACEHOLDERS.items():
        code = code.replace(word, fixture.format(**fx))
    return code


class TrainedLogits:
    """The library snippet's promise: the adapter it saves loads back onto the quantized base
    with the trained model's logits. ``...`` stands for training: B is made nonzero there."""

    def __init__(self) -> None:
        self.trained = None
        self.checked = 0

    def before(self, source: str, ns: dict) -> None:
        from tiny_lm import randomize_adapters

        if "save_adapter(" in source and "load_adapter" not in source and self.trained is None:
            randomize_adapters(ns["model"])
            self.trained = logits_of(ns["model"])

    def after(self, source: str, ns: dict) -> None:
        if "load_adapter(" in source and self.trained is not None:
            loaded = logits_of(ns["model"])
            # the same base bytes, adapter tensors and kernels: equal up to summation order
            torch_close(loaded, self.trained, f"{source.strip()!r} changed the logits")
            self.trained = None
            self.checked += 1


def logits_of(model):
    import torch

    # eval(): modules that apply / load_adapter add are in training mode (adapter dropout on)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(INPUT_IDS)).logits.float()


def torch_close(actual, expected, what: str) -> None:
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= 1e-5 * max(1.0, scale), f"{what}: max |Δlogit| {err:.3g}"


def run_snippet(code: str, ns: dict, watcher: TrainedLogits) -> None:
    """Execute ``code`` one top-level statement at a time (each with a time limit)."""
    import ast

    tree = ast.parse(code)
    for stmt in tree.body:
        source = ast.get_source_segment(code, stmt) or ""
        watcher.before(source, ns)
        with time_limit(source.splitlines()[0]):
            exec(compile(ast.Module([stmt], []), "<README.md>", "exec"), ns)
        watcher.after(source, ns)


@pytest.fixture(scope="module")
def gguf_fixture(tmp_path_factory, fixtures):
    """A tiny byte-level Llama as a Q4_1 GGUF file (the README's SmolLM2 file, in small)."""
    import loraq
    from tiny_lm import byte_tokenizer, tiny_causal_lm

    path = tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf"
    loraq.export_gguf(tiny_causal_lm(), path, merged=True, dtype="q4_1", tokenizer=byte_tokenizer())
    return {**fixtures, "gguf": str(path)}


PY_CI = [b for b in CI_BLOCKS if b.lang == "python"]


@pytest.mark.parametrize("block", PY_CI, ids=[b.id for b in PY_CI])
def test_readme_python_block_runs(block, gguf_fixture, workdir):
    code = snippet_source(block.code, gguf_fixture)
    watcher = TrainedLogits()
    run_snippet(code, snippet_namespace(code, gguf_fixture), watcher)
    if "save_adapter(" in code and "load_adapter(" in code:
        assert watcher.checked, "the adapter saved was never loaded back and compared"


# ============================================================================ every loraq line
def loraq_words(argv: list[str]) -> list[str] | None:
    """The words after ``loraq`` in a command (``loraq ...`` or ``torchrun ... -m loraq ...``)."""
    if argv[0] == "loraq":
        return argv[1:]
    if "-m" in argv and argv[argv.index("-m") + 1 : argv.index("-m") + 2] == ["loraq"]:
        return argv[argv.index("-m") + 2 :]
    return None


def check_parses(words: list[str]) -> None:
    """``loraq WORDS`` gets past the argument parser and, for ``train``, the config key check."""
    from loraq import cli
    from loraq.train.config import parse_overrides, resolve_key

    command = cli.SUBCOMMANDS[words[0]]
    if command.passthrough:
        head, overrides = cli._split_passthrough(words[1:])
        cli.build_parser().parse_args([words[0], *head])
        _, overrides = cli._pop_int_option(overrides, "--nproc")  # the launcher's own flag
        for key in parse_overrides(overrides):
            resolve_key(key)  # ConfigError naming the key and the nearest valid one
    else:
        cli.build_parser().parse_args(words)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_every_loraq_and_pip_line_parses(block, capsys):
    """Also in blocks run by hand: flags and config keys exist, extras exist (nothing runs)."""
    if block.lang != "bash":
        return
    for argv in shell_commands(block.code):
        if argv[:2] == ["pip", "install"]:
            check_pip_install(argv)
        words = loraq_words(argv)
        if words:
            try:
                check_parses(words)
            except SystemExit:
                pytest.fail(
                    f"README.md:{block.line}: {shlex.join(argv)}: {capsys.readouterr().err}"
                )


# ============================================================================ flags in prose
#: Flags of other programs that README prose names (llama.cpp's CLI, pip, cmake, lm_eval).
OTHER_PROGRAMS_FLAGS = {"--lora", "--no-deps", "--build", "--target", "--model_args"}


def known_flag(flag: str) -> bool:
    """A ``loraq`` option, a train config key, a benchmark script's flag, or another tool's."""
    from loraq import cli
    from loraq.train.config import ConfigError, resolve_key

    for parser in subcommand_parsers(cli).values():
        if flag in parser._option_string_actions:
            return True
    if flag in (cli.DEBUG_FLAG, "--nproc") or flag in OTHER_PROGRAMS_FLAGS:
        return True
    try:
        resolve_key(flag[2:])
        return True
    except ConfigError:
        pass
    return any(f'"{flag}"' in p.read_text(encoding="utf-8") for p in ROOT.glob("benchmarks/*.py"))


def subcommand_parsers(cli) -> dict:
    import argparse

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_flags_named_in_prose_exist():
    """`--flag` in running text names a real option, so renaming one fails here too."""
    prose = re.sub(r"```.*?```", "", README.read_text(encoding="utf-8"), flags=re.S)
    spans = re.findall(r"`([^`]*)`", prose)
    flags = {w for s in spans for w in s.split() if re.fullmatch(r"--[a-z][\w.-]*", w)}
    assert len(flags) > 10, flags  # the search finds them
    unknown = sorted(f for f in flags if not known_flag(f))
    assert not unknown, f"README names flags nothing defines: {unknown}"
    assert not known_flag("--no-such-flag")


# ============================================================================ figures
# Every measured ratio in README prose ("0.82×", "4.8x", "6.9–8.6×") sits in a *unit* that names
# where it comes from: a script in benchmarks/, `loraq compare`, or a test that checks it. A
# measured one (benchmark or compare) also names the kind of CPU it was measured on, since the
# ratios differ between kinds. A unit is a heading's text, a paragraph opening with a bold
# title (the Performance section's "**LoRA training step** ..."), or a top-level bullet; the
# paragraphs and tables after one belong to it (a paragraph right after a bullet list starts a
# new one).
RATIO = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:[–-]\d+(?:\.\d+)?)?[×x](?![\w×])")
SOURCE = re.compile(r"benchmarks/\w+\.(?:py|sh)|loraq compare|tests/test_\w+\.py")
MEASURED = re.compile(r"benchmarks/\w+\.(?:py|sh)|loraq compare")
#: The kinds of CPU the Performance section defines (its machines list).
CPU_KINDS = re.compile(r"AVX2-only|AVX512-BF16|AMX")


@dataclass
class Unit:
    """A stretch of README prose that one source and machine statement covers."""

    line: int
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def prose_units(text: str) -> list[Unit]:
    """README prose (fenced blocks and HTML comments left out) cut into units, as above."""
    units: list[Unit] = []
    in_fence, after_blank = False, True
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence or line.startswith("<!--"):
            continue
        if not line.strip():
            after_blank = True
            continue
        in_bullet = bool(units) and units[-1].lines[0].startswith("- ")
        starts = line.startswith(("#", "**", "- ")) or (
            after_blank and in_bullet and not line.startswith(("|", " "))
        )
        if starts or not units:
            units.append(Unit(number, []))
        units[-1].lines.append(line)
        after_blank = False
    return units


UNITS = prose_units(README.read_text(encoding="utf-8"))


def test_prose_units_and_ratios_are_found():
    sample = (
        "# T\n\nintro 0.84x and 4096x4096 and 2 × 2\n\n- a bullet 6.9–8.6×\n  more\n\n"
        "after the list\n\n**Bold** head (`benchmarks/quant.py`, AMX)\n\n| a | 1.00× |\n\n(note)\n"
        "```\n9.9x in code\n```\n"
    )
    units = prose_units(sample)
    assert [u.line for u in units] == [1, 5, 8, 10]
    assert [RATIO.findall(u.text) for u in units] == [["0.84x"], ["6.9–8.6×"], [], ["1.00×"]]
    assert "(note)" in units[-1].text and "9.9x" not in units[-1].text
    # The README itself: many figures, in many units.
    assert sum(len(RATIO.findall(u.text)) for u in UNITS) > 50
    assert len(UNITS) > 40


def test_every_figure_names_its_source_and_machine():
    """A measured ratio without its script, or without the CPU kind it holds on, fails here."""
    missing = []
    for unit in UNITS:
        if not RATIO.search(unit.text):
            continue
        head = f"README.md:{unit.line} ({unit.lines[0][:50]}...)"
        if not SOURCE.search(unit.text):
            missing.append(f"{head}: no benchmarks/ script, `loraq compare` or test named")
        elif MEASURED.search(unit.text) and not CPU_KINDS.search(unit.text):
            missing.append(f"{head}: no CPU kind (AVX2-only, AVX512-BF16, AMX) named")
    assert not missing, "figures without a source:\n" + "\n".join(missing)


def test_named_benchmark_scripts_exist():
    named = set(re.findall(r"benchmarks/\w+\.(?:py|sh)", README.read_text(encoding="utf-8")))
    assert len(named) > 5
    assert not sorted(n for n in named if not (ROOT / n).is_file())


def test_the_intro_quotes_figures_rather_than_restating_them():
    """One figure, one place: a ratio in the opening summary appears in Performance too."""
    text = README.read_text(encoding="utf-8")
    intro = text[: text.index("\n## ")]
    performance = text[text.index("\n## Performance") :]
    quoted = RATIO.findall(intro)
    assert not [r for r in quoted if r not in performance], quoted
