import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small models on a 2-core shared box: one intra-op thread is fastest and avoids
    spin-waiting; the previous setting is restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
