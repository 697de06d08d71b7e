"""The source distribution carries everything setup.py's CMake build compiles: setuptools adds only Python packages
by itself, and an sdist without csrc/ and CMakeLists.txt could not build the kernels it promises."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sdist_carries_the_compiled_sources(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".pytest_cache", ".benchmarks",
        "runs", ".whl", "results"))
    out = subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; print(b.build_sdist('dist'))"],
                         cwd=src, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    with tarfile.open(src / "dist" / out.stdout.strip().splitlines()[-1]) as tar:
        packed = {Path(*Path(name).parts[1:]).as_posix() for name in tar.getnames()}
    needed = {p.relative_to(src).as_posix() for p in (src / "csrc").rglob("*") if p.is_file()}
    assert any(n.endswith(".cu") for n in needed) and any(n.endswith(".cpp") for n in needed)
    needed |= {"CMakeLists.txt", "setup.py", "pyproject.toml", "rmi_fast/tuned/amd-epyc-avx512.json",
               "rmi_fast/py.typed"}
    assert needed <= packed, sorted(needed - packed)
