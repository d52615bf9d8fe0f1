"""A trainer's curve from its ``metrics.jsonl``: window means as a Markdown table, and a plot.

    python -m evals.training_curve evals/artifacts/adapters/commongen/metrics.jsonl \\
        --window 20 --png evals/artifacts/adapters/commongen/curve.png

Every trainer (``llmsample.train.base.Trainer``) logs ``{"event": "train", "step": ...}``
records every ``log_every`` steps (the statistics of that step) and ``{"event": "eval"}``
records. The table averages each metric over the train records in consecutive windows of
``--window`` steps (a cell is blank where no record in the window has the metric);
``--metrics`` picks the columns (default: those of the GFlowNet trainer). The plot draws
each metric's train records against the step, the eval records' ``log_reward`` (where
present) as markers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["load_events", "window_means", "markdown_table", "plot", "main"]

DEFAULT_METRICS = ["log_reward", "log_reward_replay", "loss", "log_z"]


def load_events(path: str | Path) -> list[dict]:
    """The JSON records of a ``metrics.jsonl`` (an error naming the file if it has none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file (a trainer's metrics.jsonl)")
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not any(e.get("event") == "train" for e in events):
        raise ValueError(f"{path} has no train records; was the run logged (log_every > 0)?")
    return events


def window_means(events: list[dict], window: int, metrics: list[str]) -> list[dict]:
    """One row per window of ``window`` steps: ``first``/``last`` step and each metric's
    mean over the train records in it (None where none has it)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    groups: dict[int, list[dict]] = {}
    for e in events:
        if e.get("event") == "train":
            groups.setdefault((e["step"] - 1) // window, []).append(e)
    rows = []
    for g in sorted(groups):
        recs = groups[g]
        row = dict(first=g * window + 1, last=max(r["step"] for r in recs))
        for m in metrics:
            vals = [r[m] for r in recs if r.get(m) is not None]
            row[m] = sum(vals) / len(vals) if vals else None
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], metrics: list[str]) -> str:
    lines = ["| steps | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for r in rows:
        cells = ["" if r[m] is None else f"{r[m]:.2f}" for m in metrics]
        lines.append(f"| {r['first']}-{r['last']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(events: list[dict], metrics: list[str], png: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [e for e in events if e.get("event") == "train"]
    evals = [e for e in events if e.get("event") == "eval" and "log_reward" in e]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        pts = [(e["step"], e[m]) for e in train if e.get(m) is not None]
        ax.plot([s for s, _ in pts], [v for _, v in pts], lw=1, label="train")
        if m == "log_reward" and evals:
            ax.plot([e["step"] for e in evals], [e[m] for e in evals], "o", label="eval")
            ax.legend(fontsize=8)
        ax.set(title=m, xlabel="step")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics_file", help="a trainer's metrics.jsonl")
    p.add_argument("--window", type=int, default=20, help="steps per table row")
    p.add_argument("--metrics", nargs="+", default=DEFAULT_METRICS, help="columns")
    p.add_argument("--png", default="", help="also write the plot here")
    args = p.parse_args(argv)
    try:
        events = load_events(args.metrics_file)
        rows = window_means(events, args.window, args.metrics)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(rows, args.metrics))
    if args.png:
        plot(events, args.metrics, args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
