import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors: a second OpenMP thread only adds spin-wait stalls when the cores are shared.

    Test modules that work on tiny tensors use it for every test: ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
