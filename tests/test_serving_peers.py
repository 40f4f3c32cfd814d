"""benchmarks/serving_peers.py without the peers: the trace, the report, skipping, and
the interleaved driver protocol end to end with stand-in drivers (no model runs)."""

from __future__ import annotations

import json
import pathlib
import sys
import textwrap

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import serving_peers  # noqa: E402
from peers import report  # noqa: E402
from peers.driver import READY_MARKER, Driver, System, Unavailable, peer_python  # noqa: E402
from peers.workload import ModelShape, TraceShape, make_trace  # noqa: E402


def test_trace_is_seeded_and_within_bounds():
    shape = TraceShape()
    shape.check(ModelShape())
    a, b = make_trace(shape, 4096), make_trace(shape, 4096)
    assert a == b
    assert a != make_trace(TraceShape(seed=1), 4096)
    reqs = a["requests"]
    assert len(reqs) == 128
    lengths = [len(r["prompt"]) for r in reqs]
    assert min(lengths) >= 100 and max(lengths) <= 400 and len(set(lengths)) > 50
    assert all(r["max_tokens"] == 64 for r in reqs)
    assert all(0 <= t < 4096 for r in reqs for t in r["prompt"])
    assert len(a["batch1"]["prompt"]) == 128 and a["batch1"]["max_tokens"] == 64
    assert a["settings"] == dict(max_num_seqs=64, max_num_batched_tokens=512, max_model_len=512)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(prompt_max=460), "exceeds max_model_len"),
        (dict(max_model_len=1024, prompt_max=900), "max_position"),
        (dict(prompt_min=50, prompt_max=10), "prompt_min <= prompt_max"),
        (dict(output_len=0), "output_len"),
    ],
)
def test_trace_shape_rejects_what_cannot_run(fields, message):
    with pytest.raises(ValueError, match=message):
        TraceShape(**fields).check(ModelShape())


def test_scaled_down_options():
    args = serving_peers.parse_args(["--quick", "--requests", "5", "--output-len", "3"])
    shape = serving_peers.trace_shape(args)
    assert (shape.num_requests, shape.output_len, shape.max_num_seqs) == (5, 3, 8)
    assert serving_peers.trace_shape(serving_peers.parse_args([])) == TraceShape()
    with pytest.raises(SystemExit):
        serving_peers.parse_args(["--rounds", "0"])


def _rows():
    rows = []
    for rnd, (j, v) in enumerate([(100.0, 200.0), (110.0, 100.0), (90.0, 300.0)]):
        rows.append(dict(system="jenga", kind="trace", round=rnd, wall_s=1.0, output_tokens=j))
        rows.append(dict(system="vllm", kind="trace", round=rnd, wall_s=2.0, output_tokens=2 * v))
        rows.append(dict(system="jenga", kind="batch1", round=rnd, ms_per_token=3.0 + rnd))
        rows.append(dict(system="vllm", kind="batch1", round=rnd, ms_per_token=4.0))
    return rows


def test_medians_and_ratios():
    ready = {n: dict(load_s=1.0, warmup_s=2.0, threads=f"{n} threads") for n in ("jenga", "vllm")}
    summary = report.summarize(_rows(), ready)
    assert summary["jenga"]["tokens_per_s"] == 100.0
    assert summary["jenga"]["tokens_per_s_rounds"] == [100.0, 110.0, 90.0]
    assert summary["vllm"]["tokens_per_s"] == 200.0
    assert summary["jenga"]["batch1_ms_per_token"] == 4.0
    r = report.ratios(summary)
    assert r["vllm"]["median"] == 0.5  # a ratio of medians, not a median of ratios
    assert r["vllm"]["rounds"] == pytest.approx([0.5, 1.1, 0.3])
    table = report.format_table(summary, {"jenga": "0/128 differ vs vllm", "vllm": "reference"})
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["system", "out", "tok/s"]
    assert "0.50x (0.50, 1.10, 0.30)" in lines[2]
    assert "0/128 differ vs vllm" in lines[1] and "vllm threads" in lines[2]
    assert report.ratios(summary, base="easydel") == {}


def test_token_agreement():
    ref = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert report.mismatches(ref, ref) == 0
    other = [[1, 2, 3], [4, 0, 6], [7, 8]]
    assert report.mismatches(other, ref) == 2
    assert report.first_difference(other, ref) == (1, 1)
    assert report.first_difference(ref, ref) is None
    with pytest.raises(ValueError):
        report.mismatches(ref[:2], ref)
    got = serving_peers.agreement({"vllm": ref, "jenga": other}, "vllm")
    assert got == {"vllm": "reference", "jenga": "2/3 differ vs vllm, first at request 1 token 1"}


def test_peer_without_a_finished_venv_is_skipped(tmp_path):
    with pytest.raises(Unavailable, match="setup.sh vllm"):
        peer_python("vllm", tmp_path)
    python = tmp_path / "vllm" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)
    with pytest.raises(Unavailable, match="incomplete"):
        peer_python("vllm", tmp_path)
    (tmp_path / "vllm" / READY_MARKER).write_text("")
    assert peer_python("vllm", tmp_path) == str(python)


def test_a_driver_that_fails_is_reported_with_its_log(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("import sys\nprint('no such engine', file=sys.stderr)\nsys.exit(3)\n")
    d = Driver(System("broken", sys.executable, str(script), {}), tmp_path, tmp_path / "t",
               tmp_path / "broken.log")  # fmt: skip
    with pytest.raises(Unavailable, match="(?s)code 3.*no such engine"):
        d.read()
    d.close()


FAKE_DRIVER = """
import sys
sys.path.insert(0, {peers!r})
from protocol import serve

def generate(engine, prompts, max_tokens):
    out = [[(sum(p) + k) % 97 for k in range(m)] for p, m in zip(prompts, max_tokens)]
    if engine == "odd" and len(prompts) > 1:
        out[0] = [t + 1 for t in out[0]]  # one request differs from the others'
    return out

serve(lambda ckpt, settings: {name!r}, generate, lambda e: dict(threads="1 fake thread"))
"""


def test_interleaved_rounds_json_and_skips(tmp_path, monkeypatch, capsys):
    """Stand-in drivers speak the real protocol; vllm's differs on one request and
    easydel is not installed."""
    scripts = {}
    for name, engine in (("jenga", "same"), ("vllm", "odd")):
        scripts[name] = tmp_path / f"{name}.py"
        peers = str(BENCH / "peers")
        scripts[name].write_text(textwrap.dedent(FAKE_DRIVER.format(peers=peers, name=engine)))

    def fake_system(name, peers_dir):
        if name == "easydel":
            return peer_python(name, tmp_path / "no-peers")
        return System(name, sys.executable, str(scripts[name]), {})

    monkeypatch.setattr(serving_peers, "system", fake_system)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")  # an existing checkpoint is reused, not made
    out = tmp_path / "peers.jsonl"
    serving_peers.main(
        ["--quick", "--rounds", "2", "--requests", "6", "--checkpoint", str(ckpt),
         "--transformers-check", "0",
         "--json", str(out), "--logs", str(tmp_path / "logs")]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "1/6 differ vs vllm, first at request 0 token 0" in printed
    assert "skipped easydel: no venv" in printed
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    runs, summary = lines[:-1], lines[-1]
    order = [(r["round"], r["kind"], r["system"]) for r in runs]
    assert order == [
        (0, "trace", "jenga"), (0, "trace", "vllm"), (0, "batch1", "jenga"),
        (0, "batch1", "vllm"), (1, "trace", "jenga"), (1, "trace", "vllm"),
        (1, "batch1", "jenga"), (1, "batch1", "vllm"),
    ]  # fmt: skip
    for r in runs:
        assert len(r["loadavg"]) == 3
        if r["kind"] == "trace":
            assert r["output_tokens"] == 6 * 16 and r["tokens_per_s"] > 0
            assert "tokens" not in r  # token lists stay out of the JSON lines
    assert summary["kind"] == "summary" and summary["rounds"] == 2
    assert set(summary["systems"]) == {"jenga", "vllm"}
    assert summary["systems"]["vllm"]["threads"] == "1 fake thread"
    assert "easydel" in summary["skipped"] and "vllm" in summary["jenga_vs"]
    assert summary["greedy_tokens"]["jenga"].startswith("1/6 differ vs vllm")
