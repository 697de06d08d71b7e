"""Time and peak memory of the examples' losses: rmi_fast against the same loss written on the materialised matrix.

    python examples/measure_losses.py [--repeat 5] [--backend auto]

Each (case, variant) runs in a fresh process. Time: median forward + backward. Memory: rise of the process's peak
resident set size over its level with the inputs allocated and both variants warmed up on a small problem.
"""
import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import rmi_fast as rf

CASES = {"acl": "NT-Xent, 2N = 8192 rows, D = 128", "tecoa": "CE, B = 4096 images, C = 1000 classes, D = 512"}


def simclr_by_hand(z, tau):
    """NT-Xent of two views [view 1; view 2] on the materialised (2N)×(2N) similarity matrix."""
    z = F.normalize(z, dim=1)
    n = z.shape[0] // 2
    sim = (z @ z.T / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    return F.cross_entropy(sim, torch.arange(2 * n).roll(n))


def problem(case, scale=1):
    g = torch.Generator().manual_seed(0)
    if case == "acl":
        z = torch.randn(8192 // scale, 128, generator=g).requires_grad_()
        return (z,), {"hand": lambda: simclr_by_hand(z, 0.5),
                      "rmi_fast": lambda b: rf.nt_xent_loss(z, temperature=0.5, backend=b)}
    img = torch.randn(4096 // scale, 512, generator=g).requires_grad_()
    text = torch.randn(1000 // scale, 512, generator=g)
    y = torch.randint(0, text.shape[0], (img.shape[0],), generator=g)
    ls = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    hand = lambda: F.cross_entropy(ls.exp() * F.normalize(img, dim=1) @ F.normalize(text, dim=1).T, y)  # noqa: E731
    ours = lambda b: rf.infonce_loss(img, text, targets=y, logit_scale=ls, normalize=True, backend=b)  # noqa: E731
    return (img, ls), {"hand": hand, "rmi_fast": ours}


def run_one(case, variant, repeat, backend):
    for _, fns in (problem(case, scale=16),):  # warm-up of both variants on a small problem
        fns["hand"]().backward()
        fns["rmi_fast"](backend).backward()
    leaves, fns = problem(case)
    fn = fns["hand"] if variant == "hand" else (lambda: fns["rmi_fast"](backend))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeat + 1):
        for t in leaves:
            t.grad = None
        start = time.perf_counter()
        fn().backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base  # KiB on Linux
    return {"ms": 1e3 * statistics.median(times[1:]), "peak_mb": peak / 1024}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--backend", default="auto")
    p.add_argument("--one", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.repeat, args.backend)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rmi_fast backends {rf.available_backends()}")
    for case, shape in CASES.items():
        for variant in ("hand", "rmi_fast"):
            out = subprocess.run([sys.executable, __file__, "--one", case, variant, "--repeat", str(args.repeat),
                                  "--backend", args.backend], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout)
            print(f"{case:6s} {shape:48s} {variant:9s} {r['ms']:9.1f} ms fwd+bwd  peak +{r['peak_mb']:7.1f} MB")


if __name__ == "__main__":
    main()
