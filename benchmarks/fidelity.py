"""Quantization fidelity on real models: dense vs NF4 vs LoftQ, and the three merge choices.

Run (emulating the 2-core CI machine; writes docs/fidelity.md):

    taskset -c 0,1 python benchmarks/fidelity.py --out docs/fidelity.md

MiniLM (``loraq train``'s built-in task: all-MiniLM-L6-v2 as a sentiment classifier, NF4 with
double quantization, r=8, alpha=16, all linear layers) and stories260K (a real pretrained tiny
Llama, read from ../shared/models/stories260K when present, NF4 r=8 alpha=16 all-linear):

* before training: the dense base, the NF4 base, NF4 + LoftQ init (5 iterations). The
  classification head is the same seeded random head in every MiniLM row, so accuracy is at
  chance; the KL column (to the dense base) measures how much of the base each one keeps.
* after the same short fine-tune (QLoRA, and QLoRA from a LoftQ init): unmerged, merged into the
  dequantized base, merged into the original weights, merged then re-quantized; KL and max
  logit difference are to the unmerged model (what :mod:`loraq.model.merging` reports).

The eval metric is accuracy (MiniLM, held-out set) or perplexity (stories260K, held-out text).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import loraq  # noqa: E402
from loraq.model.merging import MERGE_TARGETS, output_error  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from stories import load_stories, stories_task  # noqa: E402

Row = tuple[str, dict[str, float], tuple[float, float] | None]


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


def _base_error(reference: torch.Tensor, outputs: torch.Tensor, kind: str) -> tuple[float, float]:
    """(max abs difference, KL) for logits; (max abs difference, mean 1 - cosine) for
    sentence embeddings."""
    if kind == "logits":
        return output_error(reference, outputs, True)
    diff = float((outputs - reference).abs().max())
    cos = torch.nn.functional.cosine_similarity(outputs.double(), reference.double(), dim=-1)
    return diff, max(0.0, float((1 - cos).mean()))  # cosine may round a hair above 1


def _rows_for(task, log) -> tuple[list[Row], list[Row]]:
    """(rows before training, rows after); ``task`` knows how to build, train and evaluate."""
    before: list[Row] = []
    reference = None
    for label, build in (
        ("dense base", task.dense),
        ("NF4 base", lambda: task.quantized(init=None)),
        ("NF4 + LoftQ init (5 iters)", lambda: task.quantized(init="loftq")),
    ):
        model = build().eval()
        outputs = task.base_outputs(model)
        reference = outputs if reference is None else reference
        error = _base_error(reference, outputs, task.base_kind)
        before.append((label, task.evaluate(model), error))
        log(f"{task.name}: {before[-1]}")
    after: list[Row] = []
    original = task.dense().state_dict()
    for init in ("kaiming", "loftq"):
        trained = task.trained(init).eval()
        unmerged = _logits(trained, task.probe)
        name = "QLoRA" if init == "kaiming" else "QLoRA from LoftQ init"
        after.append((f"{name}: unmerged", task.evaluate(trained), None))
        for into in MERGE_TARGETS:
            given = original if into == "original" else None
            merged = loraq.unload(
                copy.deepcopy(trained), merge_into=into, original=given, calibration=task.ids
            ).eval()
            error = output_error(unmerged, _logits(merged, task.probe), True)
            after.append((f"{name}: merged into {into}", task.evaluate(merged), error))
            log(f"{task.name}: {after[-1]}")
    return before, after


def _table(title: str, metric: str, columns: tuple[str, str], rows: list[Row]) -> str:
    lines = [
        f"### {title}",
        "",
        f"| model | {metric} | eval loss | {columns[0]} | {columns[1]} |",
        "|---|---|---|---|---|",
    ]
    for label, scores, error in rows:
        value = scores.get("eval_accuracy", scores.get("eval_perplexity"))
        diff, second = error if error is not None else (None, None)
        cells = [
            label,
            f"{value:.4f}",
            f"{scores['eval_loss']:.4f}",
            "reference" if error is None else f"{diff:.3g}",
            "reference" if error is None else f"{second:.3g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _section(task, metric: str) -> str:
    before, after = _rows_for(task, print)
    base_columns = (
        ("max abs logit diff to dense", "KL to dense (nats/position)")
        if task.base_kind == "logits"
        else ("max abs embedding diff to dense", "mean 1 - cos(embedding, dense)")
    )
    after_columns = ("max abs logit diff to unmerged", "KL to unmerged (nats/position)")
    return "\n".join(
        [
            _table(f"{task.name}: the base before training", metric, base_columns, before),
            _table(f"{task.name}: after the same fine-tune", metric, after_columns, after),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/fidelity.md")
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps (MiniLM)")
    parser.add_argument("--only", choices=["minilm", "stories"], help="one model only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        from minilm_task import minilm_task

        if args.only in (None, "minilm"):
            task = minilm_task(Path(tmp) / "minilm", args.steps)
            sections["minilm"] = _section(task, "accuracy")
        if args.only in (None, "stories") and load_stories() is not None:
            sections["stories"] = _section(stories_task(Path(tmp) / "stories"), "perplexity")
    out = Path(args.out)
    out.write_text(_updated(out.read_text(encoding="utf-8") if out.exists() else "", sections))
    print("\n".join(sections.values()))


def _updated(text: str, sections: dict[str, str]) -> str:
    """``text`` with the tables of ``sections`` replaced (each between its own markers), the
    prose above ``<!-- tables -->`` and the other model's tables kept."""
    head, _, tables = text.partition("<!-- tables -->")
    parts = []
    for key in ("minilm", "stories"):
        begin, end = f"<!-- {key} -->", f"<!-- /{key} -->"
        old = tables.split(begin, 1)[1].split(end, 1)[0] if begin in tables else ""
        body = sections.get(key, old.strip("\n") + "\n" if old.strip() else "")
        if body:
            parts.append(f"{begin}\n\n{body}\n{end}\n")
    return (head if text else "") + "<!-- tables -->\n\n" + "\n".join(parts)


if __name__ == "__main__":
    main()
