"""Run the strategy tests' tiny models on one torch thread.

The models here are a few hundred values; on a shared two-core machine a
second intra-op thread only adds contention.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
