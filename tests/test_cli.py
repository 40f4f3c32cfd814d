"""The command line and the rough edges a new user hits first: `jenga-jax --help`
without JAX, options refused before anything loads, checkpoint files that are not
JSON, converting into an existing directory, the memory report's default workload."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from jenga_jax.cli import build_parser, main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )


def test_help_imports_no_jax():
    code = (
        "import sys\nfrom jenga_jax.cli import main\n"
        "for argv in ([], ['serve', '-h'], ['generate', '-h'], ['report', '-h']):\n"
        "    try:\n        main(argv or ['-h'])\n    except SystemExit:\n        pass\n"
        "assert 'jax' not in sys.modules and 'fastapi' not in sys.modules, sorted(sys.modules)\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert "--kv-memory-fraction" in result.stdout and "(default: 0.9)" in result.stdout


def test_every_option_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "serve" in a.choices)
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["serve", "{ckpt}", "--kv-memory-fraction", "0"], "must be a finite number > 0"),
        (["serve", "{ckpt}", "--kv-memory-fraction", "1.5"], "must be in (0, 1]"),
        (["serve", "{ckpt}", "--port", "70000"], "must be in [1, 65535]"),
        (["serve", "{ckpt}", "--max-num-seqs", "0"], "must be >= 1"),
        (["serve", "{ckpt}", "--kv-budget-mib", "nan"], "must be a finite number > 0"),
        (["serve", "/no/such/dir"], "no directory at /no/such/dir"),
        (["serve", "{tmp}"], "has no config.json"),
        (["generate", "{ckpt}"], "the following arguments are required: prompts"),
        (["convert", "{ckpt}", "{ckpt}"], "exists; give a new directory"),
    ],
)
def test_bad_options_are_refused_at_once(argv, message, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    argv = [a.format(ckpt=ckpt, tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_config_that_is_not_json_names_the_file(tmp_path, capsys):
    from models.hf import CheckpointError
    from models.pretrained import load_pretrained

    (tmp_path / "config.json").write_text('{"vocab_size": 32,')
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_pretrained(tmp_path)
    assert main(["generate", str(tmp_path), "hi"]) == 1  # an error line, no traceback
    err = capsys.readouterr().err
    assert "config.json is not valid JSON" in err and "Traceback" not in err


def test_convert_into_an_existing_directory_is_one_error_line(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "out").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "models.hf.convert", str(tmp_path / "hf"), str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "exists" in result.stderr


def test_memory_report_picks_a_text_workload_for_text_models(capsys):
    from jenga_jax.memory_report import main as report

    report(["--model", "gemma-3-27b", "--num-requests", "40", "--kv-budget-gib", "1"])
    out = capsys.readouterr().out
    assert "40 sharegpt-like requests" in out
    assert "the requests of paged" in out and "jenga runs 0.00x" not in out
    report(["--model", "gemma-3-27b", "--num-requests", "40"])  # 40 GiB: never saturated
    assert "the pool never filled up" in capsys.readouterr().out


def test_serve_example_refuses_bad_options_before_loading():
    for argv, message in (
        (["--requests", "0"], "must be >= 1"),
        (["--kv-budget-mib", "-1"], "must be a finite number > 0"),
    ):
        code = (
            f"import sys\nsys.argv = ['serve.py', *{argv!r}]\nimport runpy\n"
            "try:\n    runpy.run_path('examples/serve.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 2\n"
            "assert 'jax' not in sys.modules\n"
        )
        result = _python(code)
        assert result.returncode == 0 and message in result.stderr, result.stderr


def test_serve_example_families_are_the_models():
    from models import FAMILIES

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import serve
    finally:
        sys.path.pop(0)
    assert serve.FAMILIES == tuple(sorted(FAMILIES))


def test_demo_checkpoint_refuses_an_existing_directory(tmp_path):
    from jenga_jax.demo_checkpoint import write_demo_checkpoint

    with pytest.raises(FileExistsError):
        write_demo_checkpoint(tmp_path)
