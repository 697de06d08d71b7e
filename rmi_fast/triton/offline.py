"""The Triton kernels compiled for a GPU on a machine without one: what each launch would run there, and its cost.

Triton specialises every launch on its arguments: an integer equal to 1 becomes a constant, and integers divisible by
16 and 16-byte-aligned pointers are marked as such. That is what turns a contiguous tile's loads into 16-byte vectors
that the pipeliner stages through shared memory with cp.async; the same kernel compiled from a signature of plain
integers shows neither, and needs far more registers. Inside :func:`compile_launches` this package's launchers run as
usual, on CPU tensors but with their GPU tile configurations, and each kernel launch is compiled for the target GPU
from exactly those arguments instead of being run: the binary an H100 would run for them, its resources and its
instruction mix read off the cubin by cuobjdump (shipped with Triton's NVIDIA backend). No kernel runs, so the
outputs the launchers return hold garbage.

Uses Triton's launcher internals (the argument binder and ``JITFunction._pack_args`` of Triton 3.x): where they differ,
:func:`unsupported` says why.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile

_active = False

#: SASS opcodes counted per kernel: tensor-core products (HGMMA: Hopper's wgmma, HMMA: mma.sync), asynchronous
#: global → shared copies (LDGSTS: cp.async, UTMALDG: TMA), plain global loads and stores, shared-memory traffic,
#: exponentials and global atomics (REDG: without a result, as tl.atomic_add's; ATOMG: with one).
OPCODES = ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDG", "STG", "LDS", "LDSM", "STS", "MUFU.EX2", "REDG", "ATOMG")


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One launch, compiled: kernel name, its compile-time constants (tile sizes, modes), launch options and the
    cubin's resources per thread (registers, bytes spilled to the stack) and per block (dynamic shared memory)."""

    kernel: str
    constants: dict
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    instructions: dict

    def __str__(self) -> str:
        tiles = " ".join(f"{k}={v}" for k, v in self.constants.items() if k.startswith("BLOCK"))
        ops = " ".join(f"{k}:{v}" for k, v in self.instructions.items() if v)
        return (f"{self.kernel} [{tiles} warps={self.num_warps} stages={self.num_stages}] regs={self.registers} "
                f"spill={self.spill_bytes}B smem={self.shared_bytes}B {ops}")


def active() -> bool:
    """Whether launches are being compiled offline (the launchers then pick GPU tile configurations)."""
    return _active


def _tools():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def unsupported() -> str | None:
    """Why launches cannot be compiled offline with the installed Triton, or None."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as exc:
        return f"this Triton lacks the launcher internals offline compiling needs ({exc})"
    if not hasattr(JITFunction, "_pack_args"):
        return f"Triton {triton.__version__} packs launch arguments differently (no JITFunction._pack_args)"
    if not os.path.exists(_tools()):
        return "this Triton build ships no cuobjdump (its NVIDIA backend is missing)"
    return None


def _inspect(cubin: bytes) -> tuple[int, int, dict]:
    """(registers, spilled bytes, opcode counts) of a cubin with one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tools(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tools(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spilled = int(re.search(r"STACK:(\d+)", usage).group(1))
    # instruction lines: /*0070*/  [@!P0] OPCODE.MODIFIERS operands ;
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    counts = {op: sum(1 for o in opcodes if o == op or o.startswith(op + ".")) for op in OPCODES}
    return registers, spilled, counts


@contextlib.contextmanager
def compile_launches(capability: int = 90):
    """Compile every Triton launch made inside for the GPU of this compute capability (90: H100/H200) instead of
    running it; yields the list that collects a :class:`Compiled` per launch. Not thread-safe (it patches Triton's
    launcher for the duration)."""
    reason = unsupported()
    if reason is not None:
        raise RuntimeError(reason)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    global _active
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    launches: list[Compiled] = []

    def compile_instead(fn, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        registers, spilled, counts = _inspect(kernel.asm["cubin"])
        constants = {fn.arg_names[path[0]]: value for path, value in constexprs.items() if len(path) == 1
                     and not callable(value)}
        launches.append(Compiled(fn.__name__, constants, options.num_warps, options.num_stages, registers, spilled,
                                 kernel.metadata.shared, counts))

    run = JITFunction.run
    JITFunction.run = compile_instead
    _active = True
    try:
        yield launches
    finally:
        _active = False
        JITFunction.run = run
