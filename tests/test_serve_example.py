"""examples/serve.py runs: the workload mode prints its metrics table (jenga and paged
side by side), the interactive mode streams a reply to each stdin line."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--max-model-len", "96"]


def run(args, stdin=""):
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "serve.py"), *args],
        input=stdin, capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip


def test_workload_mode_compares_allocators(tmp_path):
    out = tmp_path / "serve.jsonl"
    args = ["--requests", "6", "--image-tokens", "40", "--max-encoder-tokens", "64", "--quiet"]
    result = run([*args, *SMALL, "--compare", "--json", str(out)])
    for label in ("requests/s", "tokens/s", "mean batch size", "TTFT", "TPOT", "KV waste"):
        assert label in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["allocator"] for r in rows] == ["jenga", "paged"]
    assert all(r["num_requests"] == 6 and r["compilations"] == 0 for r in rows)
    assert rows[0]["generated_tokens"] == rows[1]["generated_tokens"] > 0


def test_interactive_mode_streams_replies():
    result = run(["--interactive", "--family", "llama", "--max-tokens", "5", *SMALL], "hi\nyo\n")
    replies = result.stdout.split("\n")
    assert len(replies) >= 2 and [len(r) for r in replies[:2]] == [5, 5]


def test_interactive_mode_survives_a_prompt_too_long():
    stdin = "x" * 200 + "\nyo\n"  # 200 bytes > max_model_len 96: an error line, then on
    result = run(["--interactive", "--family", "llama", "--max-tokens", "5", *SMALL], stdin)
    assert "exceed max_model_len 96" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stdout.split("\n")[0]) == 5
