"""pytest-benchmark: rf.nt_xent_loss (SimCLR, two views, cosine similarity), forward / backward / forward+backward,
every rmi_fast backend against eager PyTorch and torch.compile."""
import pytest

import cases


@pytest.mark.parametrize("param", cases.params("nt_xent"))
def test_nt_xent(benchmark, rounds, param):
    cases.run(benchmark, param, rounds)
