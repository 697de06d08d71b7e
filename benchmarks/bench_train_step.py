"""pytest-benchmark: one worst-case-MI training step (the dataset's PGD — 7 steps on CIFAR-10 — then one Adam update)
of the paper's encoder and critic at CIFAR-10 shapes (batch 128, 3×32×32; critic G = 64 locations, E = 2048),
with the MI bound fused (backend="auto") vs eager on materialised score matrices (backend="torch").

    pytest benchmarks/bench_train_step.py                 # pytest-benchmark table
    python benchmarks/bench_train_step.py [--rounds 3]    # steps/s per backend, without pytest
"""
from __future__ import annotations

import argparse
import time

import pytest
import torch

from rmi_fast.robust.training import make_worst_case_step

BACKENDS = ("auto", "torch")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
def test_worst_case_step(benchmark, rounds, backend):
    step = make_worst_case_step("cifar10", batch_size=128, backend=backend, device=DEVICE)
    step()  # warm-up: allocations, kernel selection
    benchmark.extra_info.update(dataset="cifar10", batch_size=128, backend=backend)
    benchmark.pedantic(lambda: _sync(step()), rounds=rounds, iterations=1)


def _sync(value: torch.Tensor) -> torch.Tensor:
    if value.is_cuda:
        torch.cuda.synchronize()
    return value


def steps_per_second(backend: str, rounds: int = 3, device: str = DEVICE, batch_size: int = 128) -> float:
    """Median-free simple rate: ``rounds`` timed steps after one warm-up step."""
    step = make_worst_case_step("cifar10", batch_size=batch_size, backend=backend, device=device)
    _sync(step())
    start = time.perf_counter()
    for _ in range(rounds):
        _sync(step())
    return rounds / (time.perf_counter() - start)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    rates = {b: steps_per_second(b, args.rounds, batch_size=args.batch_size) for b in BACKENDS}
    for b, r in rates.items():
        print(f"backend={b:<5}  {r:.3f} steps/s  ({1 / r:.2f} s/step) on {DEVICE}")
    print(f"speed-up auto / torch: {rates['auto'] / rates['torch']:.2f}x")
