"""A row of the benchmark table (a figure, its unit, its baseline and their ratio), the machine it ran on, the
table as text, and a run as JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class Row:
    name: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None

    @property
    def ratio(self) -> float | None:
        return None if not self.baseline_value else self.value / self.baseline_value


def alternating_rounds(rounds: int, measurements: dict[str, Callable[[], Any]]) -> dict[str, list[Any]]:
    """Each measurement once a round, in the given order, ``rounds`` times: the results per name, in round order.

    Interleaved, not one after the other, so that a drift of the machine's speed over the minutes of a run
    (30% within an hour on these machines) reaches a figure and its baseline alike."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    results: dict[str, list[Any]] = {name: [] for name in measurements}
    for _ in range(rounds):
        for name, measure in measurements.items():
            results[name].append(measure())
    return results


def middle(values: list[float]) -> float:
    """The median of ``values`` taken as one of them (the lower middle one for an even count)."""
    return middle_run([{"value": v} for v in values], "value")["value"]


def middle_run(runs: list[dict], key: str = "steps_per_s") -> dict:
    """The run whose ``key`` is the median of the runs' (the lower middle one for an even count): a whole run,
    so that its other figures (memory, bytes per step) come from the same run as the figure."""
    if not runs:
        raise ValueError("no runs to take the middle one of")
    return sorted(runs, key=lambda run: run[key])[(len(runs) - 1) // 2]


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.date.today().isoformat(),
    }


def table_lines(rows: list[Row]) -> list[str]:
    lines = [f"{'name':34} {'value':>12} {'unit':10} {'baseline':28} {'baseline value':>15} {'ratio':>7}"]
    for r in rows:
        base = f"{r.baseline_value:15.3f}" if r.baseline_value is not None else " " * 15
        ratio = f"{r.ratio:7.3f}" if r.ratio is not None else " " * 7
        lines.append(f"{r.name:34} {r.value:12.3f} {r.unit:10} {r.baseline or '':28} {base} {ratio}")
    return lines


def write_json(path: Path, rows: list[Row], *, quick: bool, seconds: float, extras: dict) -> None:
    """A run as JSON: the machine, the mode, its length, every row with its ratio, and ``extras`` (details)."""
    results = [{**asdict(r), "ratio": r.ratio} for r in rows]
    path.write_text(json.dumps({"machine": machine(), "quick": quick, "seconds": seconds, "results": results, **extras},
                               indent=1, default=str))
