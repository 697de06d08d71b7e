"""Importing rmi_fast is cheap and safe: no GPU initialisation, no triton or torch compiler import, no need for the
compiled module."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_initialises_no_gpu_and_loads_no_gpu_backend():
    out = _run("""
        import sys, torch
        import rmi_fast as rf
        x = torch.randn(6, 3)
        rf.mi_bound(x, x, "dv")
        print(torch.cuda.is_initialized(), "rmi_fast.triton" in sys.modules)
    """)
    assert out == "False False"


def test_import_leaves_the_compiler_unloaded():
    """torch._dynamo costs about 2 s to import; rmi_fast loads it only when the user compiles."""
    out = _run("""
        import sys, torch
        import rmi_fast as rf
        x = torch.randn(6, 3, requires_grad=True)
        rf.mi_bound(x, x, "dv").backward()
        print("torch._dynamo" in sys.modules)
    """)
    assert out == "False"


def test_works_without_the_compiled_module():
    out = _run("""
        import sys
        sys.modules["rmi_fast._C"] = None  # as if the package had been installed without a compiler
        import torch, rmi_fast as rf
        x = torch.randn(6, 3)
        print(rf.available_backends(), float(rf.mi_bound(x, x, "infonce")) < 10)
    """)
    assert "'torch'" in out and "'cpp'" not in out and out.endswith("True")


def test_cli_info_lists_every_backend_with_a_reason():
    out = subprocess.run([sys.executable, "-m", "rmi_fast.cli", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("cpp", "triton", "cuda", "torch"):
        assert f"  {name} " in out.stdout
    assert "torch   available" in out.stdout


def test_huge_page_mode_is_read_from_the_kernel_setting(tmp_path, monkeypatch):
    from rmi_fast import memory

    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    monkeypatch.setattr(memory, "_THP_SETTING", str(setting))
    assert memory.huge_pages() == "madvise"
    monkeypatch.setattr(memory, "_THP_SETTING", str(tmp_path / "missing"))
    assert memory.huge_pages().startswith("unknown")
