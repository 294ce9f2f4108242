"""Turning the measurements of `run.py` into the markdown table and verdicts, and writing them
into bench/BENCHMARKS.md between `<!-- deploy:begin -->` and `<!-- deploy:end -->` (the
section "Deployment (issue 4)" is appended with those markers when it is missing)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import Workload, median

BEGIN, END = "<!-- deploy:begin -->", "<!-- deploy:end -->"
SECTION = "## Deployment (issue 4)"


@dataclass(frozen=True)
class Row:
    """One line of the table: timed rounds' seconds, and per-round slowest client compute."""

    name: str
    rounds: list[float]
    slowest_client: list[float] | None = None
    #: CPU cores other processes on the machine used meanwhile (lower bound; see Interference).
    others: float | None = None

    @property
    def median(self) -> float:
        """Median seconds per timed round."""
        return median(self.rounds)


def timed(values: list[float], w: Workload) -> list[float]:
    """The timed rounds: everything after the warm-up."""
    return values[w.warmup :]


def _s(x: float) -> str:
    return f"{x:.3f}"


def _server_cpu(m: dict[str, Any], w: Workload) -> list[float]:
    return [r["server_cpu"] for r in m["fedloom"]["rounds"][w.warmup :] if "server_cpu" in r]


def _others(r: Row) -> str:
    return "-" if r.others is None else f"{r.others:.2f}"


def render(w: Workload, m: dict[str, Any], command: str, when: str, machine: str) -> str:
    """The markdown block: conditions, table, verdicts."""
    rows: dict[str, Row] = m["rows"]
    compute1 = rows["compute"].median
    ideal = compute1 / 2
    tcp, tls = rows["tcp"].median, rows["tls"].median
    mb = m["model_bytes"]
    lines = [
        f"Measured {when} on {machine}; command: `{command}`.",
        "",
        f"Workload: {w.clients} client processes on 127.0.0.1, MNIST CNN "
        f"({m['parameters']:,} float32 parameters, {mb / 1e6:.2f} MB), each client "
        f"{w.batch} examples and one SGD step per round (lr {w.lr}), FedAvg over all "
        f"{w.clients} every round; {w.warmup} warm-up rounds dropped, then the median of "
        f"{w.rounds} timed rounds. Round bytes (raw float32): {w.clients} x {mb / 1e6:.2f} MB "
        f"down + {w.clients} x {mb / 1e6:.2f} MB up = {2 * w.clients * mb / 1e6:.0f} MB"
        + (
            f"; fedloom's frames carried {m['fedloom_bytes'] / 1e6:.0f} MB."
            if "fedloom_bytes" in m
            else "."
        ),
        "",
        "| runtime | median s/round | min-max s | slowest client's compute, median s | "
        "overhead vs ideal compute (s) | other jobs' CPU meanwhile (cores) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key in ("fedloom", "flower"):
        if key not in rows:
            continue
        r = rows[key]
        slow = _s(median(r.slowest_client)) if r.slowest_client else "-"
        lines.append(
            f"| {r.name} | **{_s(r.median)}** | {_s(min(r.rounds))}-{_s(max(r.rounds))} | "
            f"{slow} | {_s(r.median - ideal)} | {_others(r)} |"
        )
    if "fedloom_transport" in rows:
        r = rows["fedloom_transport"]
        lines.append(
            f"| {r.name} | {_s(r.median)} | {_s(min(r.rounds))}-{_s(max(r.rounds))} | - | "
            f"{_s(r.median)} | {_others(r)} |"
        )
    for key in ("tcp", "tls", "compute"):
        r = rows[key]
        lines.append(
            f"| {r.name} | {_s(r.median)} | {_s(min(r.rounds))}-{_s(max(r.rounds))} | - | - "
            f"| {_others(r)} |"
        )
    lines.append(f"| ideal 2-core compute (compute floor / 2) | {_s(ideal)} | - | - | - | - |")
    cpu = [
        f"{m[k]['cpu_per_round']:.3f} CPU-s over {label}"
        for k, label in (("tcp", "TCP"), ("tls", "TLS"))
        if isinstance(m.get(k), dict) and "cpu_per_round" in m[k]
    ]
    if cpu:
        lines += [
            "",
            f"CPU per timed round of the loopback floors (driver and {w.clients} receivers): "
            + ", ".join(cpu)
            + (
                f"; fedloom's server process alone used {median(_server_cpu(m, w)):.3f} CPU-s."
                if "fedloom" in m
                else "."
            ),
        ]
    lines += ["", "Verdicts:", ""]
    if "fedloom" in rows and "flower" in rows:
        f, fl = rows["fedloom"].median, rows["flower"].median
        speed = fl / f
        lines.append(
            f"- fedloom at least 2x faster than Flower's deployment runtime: "
            f"**{'met' if speed >= 2 else 'NOT met'}**, {speed:.1f}x ({_s(f)} s vs {_s(fl)} s "
            "per round)."
        )
    if "fedloom" in rows:
        over = rows["fedloom"].median - ideal
        lines.append(
            f"- fedloom's per-round overhead within 2x of moving the round's bytes over loopback "
            f"with the same mutual TLS: **{'met' if over <= 2 * tls else 'NOT met'}**: "
            f"overhead {_s(over)} s (median round {_s(rows['fedloom'].median)} s minus ideal "
            f"2-core compute {_s(ideal)} s) is {over / tls:.2f}x the TLS floor ({_s(tls)} s). "
            f"Against plain TCP ({_s(tcp)} s, no encryption, which no deployment of fedloom "
            f"uses) it is {over / tcp:.1f}x."
        )
        if "fedloom_transport" in rows:
            alone = rows["fedloom_transport"].median
            lines.append(
                f"  Measured directly, with training switched off (each client returns a zero "
                f"update at once): a round takes {_s(alone)} s, {alone / tls:.2f}x the TLS floor "
                f"({'within' if alone <= 2 * tls else 'NOT within'} 2x) and {alone / tcp:.1f}x "
                "plain TCP."
            )
        if rows["fedloom"].slowest_client:
            alt = median(
                [
                    a - b
                    for a, b in zip(
                        rows["fedloom"].rounds, rows["fedloom"].slowest_client, strict=True
                    )
                ]
            )
            lines.append(
                f"  With overhead defined instead as round time minus that round's slowest "
                f"client's compute (`Reply.seconds`, stretched by {w.clients} processes "
                "sharing the cores), "
                f"the median is {_s(alt)} s ({alt / tcp:.1f}x TCP, {alt / tls:.1f}x TLS)."
            )
    if "same_weights" in m:
        lines.append(
            f"- Same work on both sides: the final weights of fedloom and Flower differ by at most "
            f"{m['same_weights']:.2e} (float rounding of the averaging order)."
        )
    return "\n".join(lines)


def cpu_summary(w: Workload, f: dict[str, Any] | None) -> str:
    """Where fedloom's CPU goes per timed round (`--profile`): the server process, the client
    processes in total, and the clients' `fit` alone; medians over the timed rounds."""
    if not f:
        return "(no fedloom run)"
    rounds = f["rounds"]
    server, clients, fits, wall = [], [], [], []
    for prev, cur in zip(rounds[w.warmup - 1 :], rounds[w.warmup :], strict=False):
        pm, cm = prev["client_metrics"], cur["client_metrics"]
        if "cpu_total" not in next(iter(cm.values()), {}):
            return "(no CPU accounting in the result: run with --profile)"
        clients.append(sum(cm[c]["cpu_total"] - pm[c]["cpu_total"] for c in cm if c in pm))
        fits.append(sum(m["cpu_fit"] for m in cm.values()))
        server.append(cur["server_cpu"])
        wall.append(cur["seconds"])
    total = [a + b for a, b in zip(server, clients, strict=True)]
    return (
        f"fedloom CPU per timed round (medians): round {median(wall):.3f} s wall; "
        f"server process {median(server):.3f} CPU-s; {w.clients} client processes "
        f"{median(clients):.3f} CPU-s, of which `fit` {median(fits):.3f}; all together "
        f"{median(total):.3f} CPU-s = {median(total) / median(wall):.2f} cores busy."
    )


def write_benchmarks(path: Path, block: str) -> None:
    """Replace the text between the deploy markers in `path` (append the section if absent)."""
    text = path.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = f"{head}{BEGIN}\n{block}\n{END}{tail}"
    else:
        text = f"{text.rstrip()}\n\n{SECTION}\n\n{BEGIN}\n{block}\n{END}\n"
    path.write_text(text)
