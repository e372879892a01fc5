import os
import tempfile
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# A fresh `datasets` cache per test session: pytest reuses temporary paths across sessions, and a cached
# imagefolder from an earlier session would point at images that no longer exist.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="sami-test-datasets-"))
# Tiny test models run fastest on one thread (thread hand-offs dominate, worse on a loaded machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process training run starts like a new process (accelerate keeps a process-wide singleton)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny 8 px grey 'pretrained' UNet saved as a diffusers directory with unet/ and scheduler/."""
    from tiny import save_tiny_base

    torch.manual_seed(0)
    return save_tiny_base(tmp_path_factory.mktemp("base"))
