"""TeCoA-style adversarial fine-tuning (Mao et al. 2023) of an image encoder against fixed class-text embeddings.

TeCoA fine-tunes CLIP's image encoder so that adversarial images stay closest to the text embedding of their class:
loss = CE(exp(s)·cos(f(x'), t_c), y) with the class-text embeddings t_c precomputed once by the frozen text encoder
and never re-encoded. Here the "text" embeddings are fixed random unit vectors (one per digit class), the image
encoder is a small CNN on scikit-learn's digits and s is CLIP's learnable logit scale. Each step, PGD
(rmi_fast.attacks.pgd, ℓ∞, per-sample losses, best iterate per image) maximises the per-sample loss, and the encoder
and s are trained on the adversarial images. Both use rmi_fast.infonce_loss(targets=y, logit_scale=s,
normalize=True): the fused cross-entropy against the C candidates.

    python examples/tecoa_style.py              # 300 steps, a few minutes on 2 CPU cores
    python examples/tecoa_style.py --steps 2    # a smoke run (seconds)

The defaults gave 0.994 natural / 0.850 PGD-10 accuracy at ε = 0.1 on the digits test split (3 minutes here).

The loss of one step, forward + backward, B = 4096 images against C = 1000 class embeddings of D = 512 (ImageNet
classes, CLIP ViT-B width), fp32, against F.cross_entropy on the materialised logits (examples/measure_losses.py,
median of 5; a 2-core AMD EPYC x86 VM with AVX2, torch 2.13 CPU, backend "auto" = the C++ kernels):
    hand-written   122 ms, peak memory +141 MB
    rmi_fast        74 ms, peak memory  +71 MB     (1.6x faster, 2x less memory)
With only C = 1000 candidates the B×C logits are small; the savings grow with the candidate set (e.g. symmetric
CLIP losses over the batch).
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import rmi_fast as rf
from rmi_fast.attacks import pgd
from rmi_fast.robust.data import load_dataset


def image_encoder(dim: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(64 * 16, 256), nn.ReLU(), nn.Linear(256, dim))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for flag, default in [("--steps", 300), ("--batch", 128), ("--dim", 64), ("--eps", 0.1), ("--pgd-steps", 5),
                          ("--seed", 0)]:
        p.add_argument(flag, type=type(default), default=default)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    text = F.normalize(torch.randn(10, args.dim, generator=g), dim=1)  # fixed class "text" embeddings (C, D)
    model = image_encoder(args.dim)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
    opt = torch.optim.AdamW([*model.parameters(), logit_scale], lr=1e-3, weight_decay=1e-4)

    def per_image_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (N,)
        return rf.infonce_loss(model(x), text, targets=y, logit_scale=logit_scale, normalize=True,
                               reduction="none")

    def attack(x, y, steps):
        return pgd(lambda v: per_image_loss(v, y), x, eps=args.eps, alpha=args.eps / 4, steps=steps,
                   random_start=True, per_sample=True, models=model, generator=g)

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train), (args.batch,), generator=g)
        x, y = train.images[idx], train.labels[idx]
        adv = attack(x, y, args.pgd_steps)
        model.train()
        loss = per_image_loss(adv, y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            logit_scale.clamp_(0, math.log(100))  # CLIP caps the scale at 100
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:4d}  adversarial CE {loss.item():.4f}  scale {logit_scale.exp().item():.1f}  "
                  f"{(time.perf_counter() - start) / step:.3f} s/step", flush=True)

    model.eval()
    x, y = test.images, test.labels
    adv = attack(x, y, 10)
    with torch.no_grad():
        acc = [(F.normalize(model(v), dim=1) @ text.T).argmax(1).eq(y).float().mean().item() for v in (x, adv)]
    print(f"zero-shot-style accuracy: natural {acc[0]:.3f}  PGD-10 (eps={args.eps}) {acc[1]:.3f}")


if __name__ == "__main__":
    main()
