"""pytest-benchmark: rf.infonce_loss, plain (row cross-entropy) and symmetric (the CLIP loss), forward / backward /
forward+backward, every rmi_fast backend against eager PyTorch, torch.compile and the peers (memeff, inf-cl,
cut-cross-entropy on a GPU)."""
import pytest

import cases


@pytest.mark.parametrize("param", cases.params("infonce_loss", symmetric=False))
def test_infonce_loss(benchmark, rounds, param):
    cases.run(benchmark, param, rounds)


@pytest.mark.parametrize("param", cases.params("infonce_loss", symmetric=True))
def test_clip(benchmark, rounds, param):
    cases.run(benchmark, param, rounds)
