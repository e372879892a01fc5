import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Tiny test models run fastest on one thread (thread hand-offs dominate, worse on a loaded machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
