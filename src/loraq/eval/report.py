"""The scores of ``loraq eval --tasks`` as one table (a column per variant) and as JSON.

    task            metric     base             lora
    loraq_tiny_mc   acc        0.5000 ± 0.1291  0.6250 ± 0.1250
    loraq_tiny_mc   acc_norm   0.4375 ± 0.1281  0.5625 ± 0.1281

A metric is a key of lm-eval's ``results[task]`` (``"acc,none"``: metric ``acc``, filter
``none``; the filter is shown when it is not ``none``); its ``_stderr`` twin is shown after ``±``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io.safe import atomic_write_text

STDERR_MARK = "_stderr"
#: Numbers lm-eval puts beside the metrics of a task that are not scores.
NOT_METRICS = frozenset({"sample_len"})
#: lm-eval's name of the filter that keeps responses as they are.
NO_FILTER = "none"


def metric_rows(scores: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """``(task, metric key)`` of every numeric metric in any column, in first-seen order."""
    rows: dict[tuple[str, str], None] = {}
    for result in scores.values():
        for task, metrics in result["results"].items():
            for key, value in metrics.items():
                if STDERR_MARK in key or key in NOT_METRICS or not isinstance(value, (int, float)):
                    continue
                rows[(task, key)] = None
    return list(rows)


def _cell(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    if not isinstance(value, (int, float)):
        return "-"
    if isinstance(value, int):  # a count (tokens, words)
        return str(value)
    metric, _, filt = key.partition(",")
    err = metrics.get(f"{metric}{STDERR_MARK},{filt}")
    return f"{value:.4f}" + (f" ± {err:.4f}" if isinstance(err, (int, float)) else "")


def _label(key: str) -> str:
    metric, _, filt = key.partition(",")
    return metric if filt in ("", NO_FILTER) else f"{metric} ({filt})"


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's ``results`` (``{task: {"acc,none": 0.5, "acc_stderr,none": ...}}``) as
    ``{"task/acc": 0.5}``: every numeric score, no standard errors or counts; a filter other
    than ``none`` stays in the name (``task/exact_match,strict-match``)."""
    out: dict[str, float] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if STDERR_MARK in key or key in NOT_METRICS or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                metric, _, filt = key.partition(",")
                name = metric if filt in ("", NO_FILTER) else key
                out[f"{task}/{name}"] = float(value)
    return out


def format_table(scores: dict[str, dict[str, Any]]) -> str:
    """The aligned text table: a row per task and metric, a column per variant."""
    columns = list(scores)
    lines = [["task", "metric", *columns]]
    for task, key in metric_rows(scores):
        cells = [_cell(scores[c]["results"].get(task, {}), key) for c in columns]
        lines.append([task, _label(key), *cells])
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)


def write_json(path: str | Path, scores: dict[str, dict[str, Any]]) -> None:
    """``--output FILE``: per column, lm-eval's ``results``, ``n-samples`` and (when logged)
    ``samples``, written atomically; values JSON cannot hold are written as text."""
    data = {
        name: {k: result[k] for k in ("results", "n-samples", "samples") if k in result}
        for name, result in scores.items()
    }
    text = json.dumps({"columns": list(scores), "scores": data}, indent=2, default=str)
    atomic_write_text(path, text + "\n")
