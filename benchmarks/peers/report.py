"""Medians, ratios, token agreement and the table of serving_peers.py (no system needed).

Rows are the drivers' replies plus "system" and "round": kind "trace" rows carry wall_s
and output_tokens, kind "batch1" rows ms_per_token.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def tokens_per_s(row: dict) -> float:
    return row["output_tokens"] / row["wall_s"]


def summarize(rows: Sequence[dict], ready: dict[str, dict]) -> dict[str, dict]:
    """Per system: median output tokens/s over its trace runs (and each round's value),
    median batch-1 ms per token, and what its driver said when it was ready."""
    out = {}
    for name, info in ready.items():
        runs = [r for r in rows if r["system"] == name and r["kind"] == "trace"]
        b1 = [r["ms_per_token"] for r in rows if r["system"] == name and r["kind"] == "batch1"]
        if not runs:
            continue
        per_round = [tokens_per_s(r) for r in sorted(runs, key=lambda r: r["round"])]
        out[name] = dict(
            tokens_per_s=statistics.median(per_round),
            tokens_per_s_rounds=per_round,
            batch1_ms_per_token=statistics.median(b1) if b1 else None,
            load_s=info.get("load_s"),
            warmup_s=info.get("warmup_s"),
            threads=info.get("threads"),
            version=info.get("version"),
        )
    return out


def ratios(summary: dict[str, dict], base: str = "jenga") -> dict[str, dict]:
    """base's tokens/s over each other system's: the ratio of medians and the per-round
    ratios (rounds are interleaved, so a round's systems saw the same machine load)."""
    if base not in summary:
        return {}
    b = summary[base]
    out = {}
    for name, s in summary.items():
        if name == base:
            continue
        rounds = [x / y for x, y in zip(b["tokens_per_s_rounds"], s["tokens_per_s_rounds"])]
        out[name] = dict(median=b["tokens_per_s"] / s["tokens_per_s"], rounds=rounds)
    return out


def mismatches(tokens: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> int:
    """How many requests' output tokens differ from the reference's."""
    if len(tokens) != len(reference):
        raise ValueError(f"{len(tokens)} outputs against {len(reference)} reference outputs")
    return sum(list(a) != list(b) for a, b in zip(tokens, reference))


def first_difference(tokens, reference) -> tuple[int, int] | None:
    """(request, position) of the first differing token, or None."""
    for i, (a, b) in enumerate(zip(tokens, reference)):
        for j, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return i, j
        if len(a) != len(b):
            return i, min(len(a), len(b))
    return None


def format_table(
    summary: dict[str, dict],
    agreement: dict[str, str],
    base: str = "jenga",
) -> str:
    """One row per system: tokens/s (median, then per round), base vs it, batch-1 ms per
    token, warm-up, greedy agreement and thread settings."""
    rat = ratios(summary, base)
    header = [
        "system", "out tok/s", "per round", f"{base} vs it", "batch-1 ms/tok",
        "load + warm-up s", "greedy tokens", "threads",
    ]  # fmt: skip
    lines = [header]
    for name, s in summary.items():
        if name == base:
            ratio = "1.00x"
        elif name in rat:
            r = rat[name]
            ratio = f"{r['median']:.2f}x ({', '.join(f'{x:.2f}' for x in r['rounds'])})"
        else:
            ratio = "-"
        b1 = s["batch1_ms_per_token"]
        lines.append(
            [
                name,
                f"{s['tokens_per_s']:.1f}",
                ", ".join(f"{x:.0f}" for x in s["tokens_per_s_rounds"]),
                ratio,
                "-" if b1 is None else f"{b1:.2f}",
                f"{s['load_s']:.1f} + {s['warmup_s']:.1f}",
                agreement.get(name, "-"),
                s["threads"] or "-",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
