"""Markdown table of `benchmarks/memory.py --json` rows, with jenga's ratios to the baselines.

python benchmarks/memory_table.py memory.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import json
import sys


def main(paths: list[str]) -> None:
    rows = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                rows[(r["model"], r["workload"], r["allocator"])] = r  # later files win
    print(
        "| model | workload | allocator | mean running | peak | memory-bound waste (mean / peak) "
        "| hit rate | preemptions | jenga / this |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for (model, workload, allocator), r in sorted(rows.items()):
        jenga = rows.get((model, workload, "jenga"))
        ratio = ""
        if jenga and allocator != "jenga" and r["mean_running_requests"]:
            ratio = f"{jenga['mean_running_requests'] / r['mean_running_requests']:.2f}x"
        print(
            f"| {model} | {workload} | {allocator} | {r['mean_running_requests']:.1f} "
            f"| {r['peak_running_requests']} | {r['memory_bound_mean_waste']:.2%} / "
            f"{r['memory_bound_peak_waste']:.2%} | {r['cache_hit_rate']:.1%} "
            f"| {r['preemptions']} | {ratio} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
