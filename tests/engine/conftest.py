import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Engine tests run many tiny matmuls (decode steps of a few tokens). On the shared 2-core CI machine two
    intra-op threads contend with other processes: a [3, 576] x [576, 1536] linear measured 26 ms with 2 threads
    under load, 0.9 ms with 1. Restored afterwards for other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
