"""Human-readable output: a per-round progress bar and the tables `fedloom run/runs/show` print."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from fedloom.store import RoundRecord, RunSummary

#: Metrics shown in tables, in this order, when a round has them.
_SHOWN = ("accuracy", "loss", "federated_accuracy", "federated_loss", "train_loss")


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB'."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class Progress:
    """A bar that advances one step per round, with the round's headline metric.

    On a terminal it redraws one line; otherwise it prints one line per round.
    """

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 24) -> None:
        self.total, self.width = total, width
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def update(self, record: RoundRecord) -> None:
        """Show the state after `record`'s round."""
        filled = round(self.width * record.round / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        metric = next((f"{k} {record.metrics[k]:.4f}" for k in _SHOWN if k in record.metrics), "")
        line = (
            f"round {record.round:>{len(str(self.total))}}/{self.total} [{bar}] {metric}  "
            f"clients {record.num_accepted}/{record.num_selected}  {record.seconds:.2f}s"
        )
        end = "\n" if not self.tty or record.round >= self.total else ""
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()

    def close(self) -> None:
        """End the line on a terminal."""
        if self.tty:
            self.stream.write("\n")


def rounds_table(records: Sequence[RoundRecord]) -> str:
    """One row per round: clients, shown metrics, bytes down and up, seconds, rejections."""
    metrics = [m for m in _SHOWN if any(m in r.metrics for r in records)]
    header = ["round", "clients", *metrics, "sent", "received", "seconds", "rejected"]
    rows = [
        [
            str(r.round),
            f"{r.num_accepted}/{r.num_selected}",
            *(f"{r.metrics[m]:.4f}" if m in r.metrics else "-" for m in metrics),
            human_bytes(r.bytes_down),
            human_bytes(r.bytes_up),
            f"{r.seconds:.2f}",
            str(len(r.rejections)),
        ]
        for r in records
    ]
    return _table(header, rows)


def runs_table(runs: Sequence[RunSummary]) -> str:
    """One row per run."""
    header = ["run", "name", "status", "created", "rounds", "accuracy"]
    rows = [
        [
            r.id,
            r.name,
            r.status,
            r.created.strftime("%Y-%m-%d %H:%M"),
            str(r.rounds),
            f"{r.last_metrics['accuracy']:.4f}" if "accuracy" in r.last_metrics else "-",
        ]
        for r in runs
    ]
    return _table(header, rows)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)
