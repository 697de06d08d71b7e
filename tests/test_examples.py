"""The examples run end to end on tiny settings (seconds), in a fresh interpreter as a user would run them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["--steps", "2", "--batch", "32", "--pgd-steps", "1"]


@pytest.mark.parametrize("script, last_line", [
    ("acl_style.py", "linear probe: natural"),
    ("tecoa_style.py", "zero-shot-style accuracy: natural"),
])
def test_example_runs(script, last_line):
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *TINY], capture_output=True, text=True,
                         timeout=300, cwd=EXAMPLES.parent)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("step    2")
    assert lines[-1].startswith(last_line)


def test_readme_kernel_examples_run():
    """The README's code blocks that stand alone run as written."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    blocks = [b.split("```")[0] for b in readme.split("```python\n")[1:]]
    standalone = [b for b in blocks if b.startswith("import ")]
    assert standalone, "no standalone python block in the README"
    for block in standalone:
        exec(compile(block, "README.md", "exec"), {})
