"""Render the tables of BENCHMARKS.md from the JSON of a run.

    python -m benchmarks --json benchmarks/latest.json
    python -m benchmarks.report benchmarks/latest.json                       # print the markdown
    python -m benchmarks.report benchmarks/latest.json --write BENCHMARKS.md # replace the generated part

``--write`` replaces what lies between the lines ``<!-- report:begin -->`` and ``<!-- report:end -->`` of the
file and leaves the rest (the explanations) as it is.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import scaling

BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"


@dataclass(frozen=True)
class Goal:
    text: str
    name: str  # a row's name
    baseline: str | None  # its baseline (None: the goal is on the value)
    check: Callable[[float], bool]  # on the ratio, or on the value where baseline is None
    show: str = "ratio"  # how to print what is measured: "ratio" or "value"


GOALS = (
    Goal("push ≥ 0.7 × raw gRPC", "push_GBps", "raw_grpc_GBps", lambda r: r >= 0.7),
    Goal("pull ≥ 0.7 × raw gRPC", "pull_GBps", "raw_grpc_GBps", lambda r: r >= 0.7),
    Goal("in-service update ≥ 0.8 × standalone torch.optim", "update_Mparams_per_s", "torch_adam_Mparams_per_s", lambda r: r >= 0.8),
    Goal("e2e (shared memory) ≥ 2.5 × Ray object-store PS", "e2e_steps_per_s", "ray_ps_steps_per_s", lambda r: r >= 2.5),
    Goal("e2e (shared memory) ≥ 1.5 × DDP gloo", "e2e_steps_per_s", "ddp_gloo_steps_per_s", lambda r: r >= 1.5),
    Goal("shard peak RSS over the fixed overhead ≤ 1.3 × state", "shard_peak_rss_over_fixed_MB", "shard_state_MB", lambda r: r <= 1.3),
    Goal("checkpoint stall ≤ 5% of a step", "checkpoint_stall_ms", "e2e_step_ms", lambda r: r <= 0.05),
    Goal("one shard serves ≥ 128 workers (steps/s with 128)", "shard_steps_per_s_w128", "shard_steps_per_s_w1", lambda v: v > 0, show="value"),
    Goal("kill to the next closed step, standby takeover < 2 s", "takeover_s", "e2e_step_s", lambda v: v < 2, show="value"),
    Goal("kill to the next closed step, rollback to a checkpoint < 10 s", "rollback_s", "e2e_step_s", lambda v: v < 10, show="value"),
)


def find(results: Sequence[dict[str, Any]], name: str, baseline: str | None = None) -> dict[str, Any] | None:
    """The row ``name`` (against ``baseline`` where given: a figure can have several baselines)."""
    for r in results:
        if r["name"] == name and (baseline is None or r["baseline"] == baseline):
            return r
    return None


def _num(value: float | None) -> str:
    if value is None:
        return ""
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def results_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    """The main table, a row per (figure, baseline)."""
    goal_rows = {(g.name, g.baseline) for g in GOALS}
    lines = ["| name | value | unit | baseline | baseline value | ratio |", "|---|---:|---|---|---:|---:|"]
    for r in results:
        ratio = _num(r["ratio"])
        if ratio and (r["name"], r["baseline"]) in goal_rows:
            ratio = f"**{ratio}**"
        lines.append(f"| {r['name']} | {_num(r['value'])} | {r['unit']} | {r['baseline'] or ''} | {_num(r['baseline_value'])} | {ratio} |")
    return lines


def goal_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    """Each goal, what this run measured for it and whether it is met."""
    lines = ["| goal | measured | met? |", "|---|---|---|"]
    for g in GOALS:
        row = find(results, g.name, g.baseline)
        if row is None or (g.show == "ratio" and row["ratio"] is None):
            lines.append(f"| {g.text} | not in this run | |")
            continue
        if g.show == "value":
            figure, measured = row["value"], f"{_num(row['value'])} {row['unit']}"
        else:
            figure, measured = row["ratio"], f"{_num(row['ratio'])} ({_num(row['value'])} {row['unit']} against {_num(row['baseline_value'])})"
        lines.append(f"| {g.text} | {measured} | {'yes' if g.check(figure) else '**no**'} |")
    straggler = [r for r in results if r["name"].startswith("straggler_") and r["name"].endswith("_s_to_95") and r["ratio"]]
    if straggler:
        best = min(straggler, key=lambda r: r["ratio"])
        speedup = 1 / best["ratio"]
        lines.append(f"| a straggler: the best step policy reaches 95% test accuracy ≥ 1.5× sooner than sync | "
                     f"{best['name']}: {speedup:.2f}× sooner | {'yes' if speedup >= 1.5 else '**no**'} |")
    return lines


def rounds_lines(rounds: dict[str, list[float]]) -> list[str]:
    """The figures measured in alternating rounds, each round's in order; the table holds the median of each."""
    runs = "; ".join(f"{name} {', '.join(_num(v) for v in values)}" for name, values in rounds.items())
    return [f"Measured in {max(map(len, rounds.values()))} alternating rounds, the table holding the median of each "
            f"(each round's figure, in the order they ran): {runs}."]


def render(data: dict[str, Any]) -> str:
    """The generated part of BENCHMARKS.md: what ran where, the main table, the goals, the scaling grid and the
    multi-host table."""
    m = data.get("machine", {})
    mode = "quick (`--quick`)" if data.get("quick") else "full"
    took = f", {data['seconds']:.0f} s in all" if data.get("seconds") else ""
    out = [
        (f"**Run:** {m.get('date', '?')}, {mode} mode{took}. Machine: {m.get('cpus', '?')} CPUs ({m.get('processor', '?')}), "
        f"{m.get('platform', '?')}, Python {m.get('python', '?')}, torch {m.get('torch', '?')}, "
        f"{'GPU ' + m['cuda'] if m.get('cuda') else 'no GPU'}."),
    ]
    if data.get("quick"):
        out.append("\n**These figures are from a quick run (small sizes, few steps): to be replaced by a full run.**")
    out += ["", "### All figures", "", *results_lines(data["results"]), "", "### The goals", "", *goal_lines(data["results"])]
    if "rounds" in data:
        out += ["", *rounds_lines(data["rounds"])]
    if "scaling" in data:
        s = data["scaling"]
        out += ["", "### Scaling on one host (transport auto: shared memory)", "",
                (f"{s['grid']['note']}; batch "
                f"{s['grid']['batch_size']} per worker; {s['seconds']:.0f} s. Bytes per step: {s['bytes_source']}."), "",
                *scaling.scaling_lines(s, markdown=True)]
    if "multihost" in data:
        link = data["link"]
        out += ["", "### Multi-host, gRPC only: computed, not measured across machines", "",
                (f"B = {link['link_GBps']:.3g} GB/s each way, the slower of this run's service push ({link['push_GBps']:.3g} GB/s) and "
                f"pull ({link['pull_GBps']:.3g} GB/s) over loopback. PS time max(M/B, nM/(kB)) (BytePS), ring all-reduce "
                "2(n-1)M/(nB); n worker machines, k server machines, M = the model's fp32 bytes; link MB are per step, each way."), "",
                *scaling.multihost_lines(data["multihost"], markdown=True)]
    return "\n".join(out) + "\n"


def replace_generated(text: str, generated: str) -> str:
    """``text`` with what lies between the BEGIN and END lines replaced by ``generated``."""
    try:
        head, rest = text.split(BEGIN + "\n", 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        raise ValueError(f"the file needs a line {BEGIN} and, after it, a line {END}") from None
    return f"{head}{BEGIN}\n{generated}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="the JSON of python -m benchmarks --json")
    parser.add_argument("--write", type=Path, help="replace the generated part of this markdown file (BENCHMARKS.md)")
    args = parser.parse_args(argv)
    generated = render(json.loads(args.json.read_text()))
    if args.write:
        args.write.write_text(replace_generated(args.write.read_text(), generated))
    else:
        sys.stdout.write(generated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
