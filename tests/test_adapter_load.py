"""Loading an adapter: every keyword of ``from_pretrained`` is honoured or refused (offline)."""

import json
import os

import pytest
import torch
from tiny import hub_cache, save_tiny_base, tiny_encoder

from sami_adapter import SAMIPipeline
from sami_adapter.adapter import LOAD_KWARGS, save_adapter




@pytest.fixture()
def adapter(tmp_path):
    base = save_tiny_base(str(tmp_path / "base"))
    encoder = tiny_encoder()
    with torch.no_grad():
        encoder.head.weight.normal_(0, 0.3)
    return save_adapter(str(tmp_path / "adapter"), encoder, base_model_name_or_path=base)


def test_cache_dir_and_local_files_only_reach_the_adapter_and_its_base(tmp_path):
    """An adapter repo and its base repo that exist only in a private Hub cache load offline through it."""
    cache = str(tmp_path / "cache")
    save_tiny_base(str(tmp_path / "base"))
    hub_cache(cache, "sami-test/tiny-base", str(tmp_path / "base"))
    encoder = tiny_encoder()
    save_adapter(str(tmp_path / "adapter"), encoder, base_model_name_or_path="sami-test/tiny-base")
    hub_cache(cache, "sami-test/tiny-adapter", str(tmp_path / "adapter"))

    pipe = SAMIPipeline.from_pretrained("sami-test/tiny-adapter", cache_dir=cache, local_files_only=True, token=False)
    assert pipe.unet.config.sample_size == 8 and pipe.latent_dim == encoder.config.latent_dim
    torch.testing.assert_close(pipe.encoder.head.weight, encoder.head.weight)
    assert pipe.scheduler.config.num_train_timesteps == 1000
    # A cache that holds the adapter but not its base: the error names the base.
    other = str(tmp_path / "other-cache")
    hub_cache(other, "sami-test/tiny-adapter", str(tmp_path / "adapter"))
    with pytest.raises((OSError, ValueError), match="sami-test/tiny-base"):
        SAMIPipeline.from_pretrained("sami-test/tiny-adapter", cache_dir=other, local_files_only=True)


def test_torch_dtype_casts_every_model(adapter):
    pipe = SAMIPipeline.from_pretrained(adapter, torch_dtype=torch.float64)
    assert pipe.unet.dtype == torch.float64 and pipe.encoder.dtype == torch.float64
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=1, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert out.images.dtype == torch.float64 and torch.isfinite(out.images).all()


def test_unknown_keyword_is_refused_with_the_accepted_ones(adapter):
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['cach_dir'\].*cache_dir"):
        SAMIPipeline.from_pretrained(adapter, cach_dir="/tmp")
    with pytest.raises(TypeError, match="device_map"):
        SAMIPipeline.from_pretrained(adapter, device_map="auto")
    assert set(LOAD_KWARGS) >= {"cache_dir", "local_files_only", "token", "revision", "torch_dtype"}


def test_revision_is_the_adapter_repos_and_the_base_keeps_its_recorded_one(adapter):
    """``revision`` picks the adapter repo's revision (Hub download); a local directory has none to pick,
    so asking for one is refused rather than ignored."""
    with open(os.path.join(adapter, "sami_adapter_config.json")) as f:
        assert json.load(f)["revision"] is None
    with pytest.raises(ValueError, match="revision"):
        SAMIPipeline.from_pretrained(adapter, revision="v2")
