"""Data-parallel encoder training (2 gloo ranks on loopback) against the single-process run on the same global batches.

Each rank trains on its half of every global batch with the encoder and critic under DistributedDataParallel and the
bound (in the worst-case attack and in the update) against the negatives of the whole batch: after a few steps of
worst-case MI training, interrupted and resumed from rank 0's checkpoint, every rank holds the single-process
parameters and per-step MI. The attack alone (Algorithm 1 on the whole batch's bound) gives each rank its slice of
the single-process worst-case batch: the same sign steps and the same best iterate. A global batch that does not
split over the ranks is a clear error.
"""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from rmi_fast.robust.critics import CriticConfig
from rmi_fast.robust.data import load_dataset
from rmi_fast.robust.models import EncoderConfig
from rmi_fast.robust.training import EncoderTrainConfig, train_encoder
from rmi_fast.robust.worst_case import AttackConfig, MIConfig, worst_case_batch

from conftest import spawn_ranks

WORLD = 2
ENC = EncoderConfig(in_channels=1, image_size=8, conv_channels=(4, 8), hidden=16, dim=8)
CRIT = CriticConfig(in_channels=1, image_size=8, rep_dim=8, conv_channels=(4,), width=16)
TOL = dict(rtol=1e-5, atol=1e-5)


def _config(batch_size=16, **kw):
    # 48 images, batches of 16: 3 steps per epoch. Adam normalises each gradient entry, so the rounding differences
    # of tiny entries show in the update at the scale of lr: 1e-3 keeps them well below the tolerance
    return EncoderTrainConfig(mode="worst-case", encoder=ENC, critic=CRIT,
                              attack=AttackConfig(eps=0.1, alpha=0.025, steps=3), mi=MIConfig("dv"),
                              epochs=1, batch_size=batch_size, lr=1e-3, **kw)


def _images():
    return load_dataset("digits", "train", limit=48).images


def _state(run):
    return [p.detach().clone() for p in (*run.encoder.parameters(), *run.critic.parameters())]


def _init(rank, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))


def _train_worker(rank, port, ckpt, reference):
    _init(rank, port)
    try:
        images, config = _images(), _config()
        part = train_encoder(config, images, checkpoint=ckpt, checkpoint_every=1, stop_after=2)
        assert part.step == 2 and not part.finished
        run = train_encoder(config, images, checkpoint=ckpt)  # every rank resumes from rank 0's file
        assert run.finished and run.step == 3
        ref = torch.load(reference, weights_only=True)
        for p, q in zip(_state(run), ref["params"]):
            torch.testing.assert_close(p, q, **TOL, msg="data-parallel parameters vs the single-process run")
        assert run.history == pytest.approx(ref["history"], rel=1e-5, abs=1e-5)
        saved = torch.load(ckpt, weights_only=True)
        assert saved["step"] == 3 and list(saved["encoder"]) == [k for k, _ in run.encoder.named_parameters()]
        # the attack on its own, against the trained models: this rank's slice of the whole batch's worst case
        x = images[:16]
        shard = x[rank * 8:(rank + 1) * 8]
        x_adv = worst_case_batch(run.encoder, run.critic, shard, config.attack, config.mi, gather=True)
        torch.testing.assert_close(x_adv, ref["attack"][rank * 8:(rank + 1) * 8], rtol=0, atol=1e-6)
        assert (x_adv - shard).abs().max() > 0.05  # it moved
    finally:
        dist.destroy_process_group()


def _indivisible_worker(rank, port):
    _init(rank, port)
    try:
        with pytest.raises(ValueError, match="does not split evenly over 2 data-parallel ranks"):
            train_encoder(_config(batch_size=15), _images())
    finally:
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _one_thread(torch_threads):
    torch_threads(1)


@pytest.fixture(autouse=True)
def _needs_distributed():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")


def test_data_parallel_worst_case_training_matches_single_process(tmp_path):
    single = train_encoder(_config(), _images())
    assert single.finished and single.step == 3
    untrained = train_encoder(_config(), _images(), stop_after=0)
    moved = max(float((a - b).abs().max()) for a, b in zip(_state(single), _state(untrained)))
    assert moved > 1e-3  # the comparison below is not between untouched parameters
    reference = tmp_path / "reference.pt"
    attack = worst_case_batch(single.encoder, single.critic, _images()[:16], single.config.attack, single.config.mi)
    torch.save({"params": _state(single), "history": single.history, "attack": attack}, reference)
    # a checkpoint per attempt: a retried run must not resume from the one before
    spawn_ranks(_train_worker, WORLD, lambda port: (port, str(tmp_path / f"enc-{port}.pt"), str(reference)))


def test_indivisible_global_batch_is_a_clear_error():
    spawn_ranks(_indivisible_worker, WORLD, lambda port: (port,))
