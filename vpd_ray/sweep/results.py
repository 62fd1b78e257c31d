"""What a sweep leaves behind: a trial table (CSV + Markdown), a plot, and the best config as YAML.

The functions take plain rows (one dict per trial) so they are testable without running Tune;
``trial_rows`` is the one place that reads Tune's ``ResultGrid``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

COMPLETED, STOPPED, ERROR = "completed", "stopped early", "error"


def best_value(history: list[float], mode: str) -> float:
    """The best of a trial's reported metric values (``nan`` when it reported none)."""
    values = [v for v in history if v is not None and not math.isnan(v)]
    if not values:
        return math.nan
    return min(values) if mode == "min" else max(values)


def trial_rows(result_grid: Any, keys: list[str], metric: str, mode: str, max_t: int) -> list[dict[str, Any]]:
    """One row per trial: id, swept values, best metric, steps, reports and state.

    ASHA stops trials by terminating them, so Tune marks them TERMINATED like finished ones;
    a trial that reported fewer than ``max_t`` times was stopped early.
    """
    rows = []
    for result in result_grid:
        frame = result.metrics_dataframe
        history = [] if frame is None or metric not in frame else frame[metric].tolist()
        metrics = result.metrics or {}
        iterations = int(metrics.get("training_iteration", len(history)))
        state = ERROR if result.error else (STOPPED if iterations < max_t else COMPLETED)
        rows.append({
            "trial_id": metrics.get("trial_id", Path(result.path).name),
            **{key: (result.config or {}).get(key) for key in keys},  # None: errored before it started
            metric: best_value(history, mode),
            "steps": metrics.get("step"),
            "reports": iterations,
            "state": state,
            "path": result.path,
        })
    return rows


def pick_best(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any]:
    """The row with the best metric (errors and trials without a value never win)."""
    scored = [r for r in rows if not math.isnan(r[metric])]
    if not scored:
        raise RuntimeError(f"no trial reported {metric!r}; see the trial logs under {rows[0]['path'] if rows else '?'}")
    return (min if mode == "min" else max)(scored, key=lambda r: r[metric])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return "" if value is None else str(value)


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)


def markdown_table(rows: list[dict[str, Any]], metric: str, mode: str) -> str:
    """Trials sorted best first (the path column is left to the CSV)."""
    columns = [c for c in rows[0] if c != "path"]
    ordered = sorted(rows, key=lambda r: (math.isnan(r[metric]), r[metric] if mode == "min" else -r[metric]))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in ordered]
    return "\n".join(lines) + "\n"


def plot_trials(rows: list[dict[str, Any]], metric: str, x_key: str, group_key: str | None, path: str,
                log_x: bool = True) -> None:
    """Metric against ``x_key`` (the learning rate), one colour per ``group_key`` value (the crop size)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if not math.isnan(row[metric]):
            groups.setdefault(_cell(row.get(group_key)) if group_key else "all", []).append(row)
    for label, group in sorted(groups.items()):
        ax.scatter([r[x_key] for r in group], [r[metric] for r in group], label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    if group_key:
        ax.legend(title=group_key, fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
