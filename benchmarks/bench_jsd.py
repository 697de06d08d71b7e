"""pytest-benchmark: the `jsd` bound (rf.mi_bound(x, y, "jsd")), forward / backward / forward+backward, every rmi_fast
backend against eager PyTorch, torch.compile and the peers; shapes from rmi_fast.bench.cases."""
import pytest

import cases


@pytest.mark.parametrize("param", cases.params("jsd"))
def test_jsd(benchmark, rounds, param):
    cases.run(benchmark, param, rounds)
