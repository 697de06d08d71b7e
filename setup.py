"""Builds rmi_fast._C through CMake (see CMakeLists.txt); without cmake or a C++ compiler, installs Python-only.

Install with ``pip install --no-build-isolation .`` so the build sees the torch that is already installed (an
isolated build environment would download a different torch).
Environment: RMI_FAST_NO_EXTENSION=1 skips the compiled module; RMI_FAST_NO_CUDA=1 skips the CUDA sources;
RMI_FAST_CUDA_ARCH="90" sets the CUDA architectures; RMI_FAST_BUILD_JOBS sets parallel compile jobs.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _skip_reason() -> str | None:
    if os.environ.get("RMI_FAST_NO_EXTENSION") == "1":
        return "RMI_FAST_NO_EXTENSION=1"
    if shutil.which("cmake") is None:
        return "cmake not found"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler found"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed in the build environment (use pip install --no-build-isolation)"
    return None


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        reason = _skip_reason()
        if reason:
            print(f"rmi_fast: not building the compiled module ({reason}); the torch backend still works",
                  file=sys.stderr)
            return
        if not (ROOT / "CMakeLists.txt").is_file() or not (ROOT / "csrc").is_dir():
            # a source tree without the C++/CUDA sources (e.g. an sdist built without MANIFEST.in)
            raise RuntimeError(f"rmi_fast: {ROOT} lacks CMakeLists.txt or csrc/, so the compiled module cannot be "
                               "built; use a complete source tree, or RMI_FAST_NO_EXTENSION=1 to install Python only")
        import torch
        from torch.utils import cpp_extension

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DTORCH_INCLUDE_DIRS={';'.join(cpp_extension.include_paths())}",
            f"-DTORCH_LIBRARY_DIR={Path(torch.__file__).parent / 'lib'}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if os.environ.get("RMI_FAST_NO_CUDA") == "1":
            args.append("-DRMI_FAST_NO_CUDA=ON")
        if os.environ.get("RMI_FAST_CUDA_ARCH"):
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['RMI_FAST_CUDA_ARCH']}")
        if shutil.which("ninja"):
            args.append("-GNinja")
        jobs = os.environ.get("RMI_FAST_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("rmi_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
    include_package_data=True,
)
