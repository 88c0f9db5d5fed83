import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The CI box has 2 shared cores: one intra-op thread is faster than contended two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
