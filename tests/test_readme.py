"""The README's Python snippets run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_there_are_snippets():
    assert len(SNIPPETS) == 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index, capsys):
    if "jenga_jax.demo_checkpoint" in SNIPPETS[index]:
        pytest.importorskip("tokenizers", reason="needs the weights extra")
        pytest.importorskip("jinja2", reason="needs the serve extra")
    exec(compile(SNIPPETS[index], f"README.md python snippet {index}", "exec"), {})
    assert capsys.readouterr().out.strip()  # each prints something
