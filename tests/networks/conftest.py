import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these small networks run faster so on a busy 2-core machine, where two
    threads wait at barriers for each other to be scheduled."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
