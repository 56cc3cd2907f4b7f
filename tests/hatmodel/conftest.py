"""Fixtures shared by the hatmodel tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and a shared 2-core machine loses a lot: run the
    test on one torch thread and restore the count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
