"""Sharing: a pipeline loaded from an adapter saves and pushes the adapter, not the base model, with a
model card the Hub can file. There is no network: the Hub API edge (create_repo, upload_folder) is a
local stand-in that records what would be uploaded; everything before it runs for real."""

import json
import os
import shutil

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from scripts import load_example
from tiny import hub_cache, save_tiny_base, tiny_encoder

from sami_adapter import SAMIEncoder, SAMIPipeline
from sami_adapter.adapter import save_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BASE = os.path.join(ROOT, "models", "ddpm-disks-16")


class FakeHub:
    """Stands in for the Hub API: records create_repo's arguments and every uploaded file with its size."""

    def __init__(self):
        self.created, self.files, self.cards = [], {}, []

    def create_repo(self, repo_id, private=None, token=None, exist_ok=False, **kwargs):
        self.created.append({"repo_id": repo_id, "private": private})
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
        import fnmatch

        for root, _, names in os.walk(folder_path):
            for name in names:
                rel = os.path.relpath(os.path.join(root, name), folder_path)
                if not any(fnmatch.fnmatch(rel, p) for p in ignore_patterns or []):
                    self.files[rel] = os.path.getsize(os.path.join(root, name))
        readme = os.path.join(folder_path, "README.md")
        if os.path.isfile(readme):
            with open(readme) as f:
                self.cards.append(ModelCard(f.read()))
        return f"https://huggingface.co/{repo_id}/commit/0"


@pytest.fixture()
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "create_repo", fake.create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake.upload_folder)
    return fake


def _default_adapter(tmp_path):
    """An adapter shaped like finetune.py's default (latent_dim 8, encoder 32,64, stem stride 2) on the embedded
    16 px base, recorded relative to the adapter as finetune.py records it, with a report."""
    torch.manual_seed(0)
    encoder = SAMIEncoder(in_channels=1, sample_size=16, latent_dim=8, block_out_channels=(32, 64), stem_stride=2)
    out = str(tmp_path / "sami-disks-adapter")
    base_ref = os.path.relpath(DEFAULT_BASE, out)
    metrics = {"relative_guidance_gain": 0.539, "kl_per_dim": [3.1, 2.0, 0.01], "active_dims": 2,
               "reconstruction_r2": {"x": 0.71, "y": 0.66, "radius": 0.77, "brightness": 0.5}, "train_seconds": 808.0}
    save_adapter(out, encoder, base_ref, extra={"training": {"dataset": "disks", "resolution": 16, "max_train_steps": 2500, "seed": 0},
                                                "metrics": metrics})
    os.makedirs(os.path.join(out, "report"))
    shutil.copy(os.path.join(ROOT, "docs", "default-report", "traversals.png"), os.path.join(out, "report", "traversals.png"))
    os.makedirs(os.path.join(out, "evaluation"))  # what examples/evaluate.py --output_dir ADAPTER/evaluation writes
    with open(os.path.join(out, "evaluation", "report.json"), "w") as f:
        json.dump({"metrics": {"mig": 0.0669, "dci": {"disentanglement": 0.2113}}}, f)
    os.makedirs(os.path.join(out, "checkpoint-100"))  # what a training run leaves behind: never uploaded
    return out, encoder




def test_pushing_the_default_adapter_uploads_the_adapter_not_the_base(tmp_path, hub):
    adapter, encoder = _default_adapter(tmp_path)
    pipe = SAMIPipeline.from_pretrained(adapter)
    url = pipe.push_to_hub("me/sami-disks", private=True)
    assert url.startswith("https://huggingface.co/me/sami-disks") and hub.created == [{"repo_id": "me/sami-disks", "private": True}]
    assert sorted(hub.files) == ["README.md", "encoder/config.json", "encoder/diffusion_pytorch_model.safetensors",
                                 "evaluation/report.json", "report/traversals.png", "sami_adapter_config.json"]
    # ~0.42 M float32 parameters: 1.7 MB, less than half the 4.1 MB base UNet, which is not uploaded at all.
    assert sum(p.numel() for p in encoder.parameters()) == 418_704
    assert max(hub.files.values()) < 2 * 2**20 < os.path.getsize(os.path.join(DEFAULT_BASE, "unet", "diffusion_pytorch_model.safetensors"))
    card = hub.cards[0]
    assert card.data.library_name == "sami-adapter" and "sami-adapter" in card.data.tags
    assert card.data.to_dict().get("base_model") is None  # the base is a local folder: no path on the Hub
    assert "53.9%" in card.text and "x 0.71, y 0.66, radius 0.77" in card.text and "KL per dimension (nats" in card.text
    assert "MIG: 0.067" in card.text and "DCI disentanglement: 0.211" in card.text and "![" in card.text
    assert 'SAMIPipeline.from_pretrained("me/sami-disks")' in card.text
    assert pipe.encoder is not None and os.path.isdir(os.path.join(adapter, "checkpoint-100"))  # the source is left alone


def test_the_default_adapter_pushed_in_half_precision_is_under_1_mb_and_loads_back_in_float32(tmp_path, hub):
    adapter, encoder = _default_adapter(tmp_path)
    pipe = SAMIPipeline.from_pretrained(adapter, torch_dtype=torch.float16)  # weights are pushed in the dtype they are loaded in
    pipe.push_to_hub("me/sami-disks-fp16")
    assert "encoder/diffusion_pytorch_model.safetensors" in hub.files and max(hub.files.values()) < 1_000_000
    pipe.save_pretrained(str(tmp_path / "fp16"))
    again = SAMIPipeline.from_pretrained(str(tmp_path / "fp16"))
    assert next(again.encoder.parameters()).dtype == torch.float32  # diffusers upcasts to the model's dtype
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(again.encoder.state_dict()[name], value.half().float(), rtol=0, atol=0)


def test_a_hub_base_is_the_cards_base_model_and_save_base_pushes_everything(tmp_path, hub, monkeypatch):
    cache = str(tmp_path / "cache")
    hub_cache(cache, "sami-test/tiny-base", save_tiny_base(str(tmp_path / "base")))
    save_adapter(str(tmp_path / "adapter"), tiny_encoder(), base_model_name_or_path="sami-test/tiny-base")
    pipe = SAMIPipeline.from_pretrained(str(tmp_path / "adapter"), cache_dir=cache, local_files_only=True)
    pipe.push_to_hub("me/tiny")
    assert hub.cards[0].data.base_model == "sami-test/tiny-base"
    assert "unet/diffusion_pytorch_model.safetensors" not in hub.files

    import diffusers.utils.hub_utils as hub_utils

    full = FakeHub()
    monkeypatch.setattr(hub_utils, "create_repo", full.create_repo)
    monkeypatch.setattr(hub_utils, "upload_folder", full.upload_folder)
    monkeypatch.setattr(hub_utils.ModelCard, "load", lambda *a, **k: (_ for _ in ()).throw(hub_utils.EntryNotFoundError("offline")))
    pipe.push_to_hub("me/tiny-full", save_base=True)
    assert "unet/diffusion_pytorch_model.safetensors" in full.files and "model_index.json" in full.files


def test_save_pretrained_of_a_loaded_adapter_writes_an_adapter_that_loads_back(tmp_path):
    adapter, _ = _default_adapter(tmp_path)
    pipe = SAMIPipeline.from_pretrained(adapter)
    out = tmp_path / "moved" / "copy"
    pipe.save_pretrained(out)
    assert sorted(os.listdir(out)) == ["README.md", "encoder", "evaluation", "report", "sami_adapter_config.json"]
    config = json.loads((out / "sami_adapter_config.json").read_text())
    assert config["base_model_abspath"] == os.path.abspath(DEFAULT_BASE) and config["metrics"]["active_dims"] == 2
    with pytest.raises(TypeError, match=r"save_pretrained of an adapter got \['variant'\].*Pass save_base=True"):
        pipe.save_pretrained(tmp_path / "other", variant="fp16")
    assert not (tmp_path / "other").exists()
    again = SAMIPipeline.from_pretrained(str(out))
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.encode(x).mean, pipe.encode(x).mean)
    with safe_open(str(out / "encoder" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert not any(k.startswith(("down_blocks", "up_blocks", "mid_block")) and "time" in k for k in f.keys())


def test_hub_errors_reach_the_user_with_their_own_message(tmp_path, hub, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(OSError, match=r"'nobody/not-cached' is not a local folder and could not be fetched from the Hub \(.*\)\. "
                                      r"Check the connection"):
        SAMIPipeline.from_pretrained("nobody/not-cached", cache_dir=str(tmp_path / "empty-cache"), local_files_only=True)
    import httpx

    request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    refused = HfHubHTTPError("401 Client Error: Unauthorized. Invalid username or password.",
                             response=httpx.Response(401, request=request))

    def no_login(*args, **kwargs):
        raise refused

    monkeypatch.setattr(huggingface_hub, "create_repo", no_login)
    adapter, _ = _default_adapter(tmp_path)
    with pytest.raises(HfHubHTTPError) as caught:
        SAMIPipeline.from_pretrained(adapter).push_to_hub("me/sami-disks")
    assert caught.value is refused and not hub.files


def test_finetune_pushes_the_adapter_without_checkpoints(tmp_path, hub):
    from accelerate.state import AcceleratorState

    finetune = load_example("finetune")
    base = save_tiny_base(str(tmp_path / "base"))
    out = tmp_path / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        finetune.main(["--pretrained_model_name_or_path", base, "--output_dir", str(out), "--resolution", "8", "--train_batch_size", "2",
                       "--latent_dim", "2", "--encoder_channels", "8,16", "--report_to", "none", "--max_train_steps", "2",
                       "--checkpointing_steps", "1", "--no_report", "--validation_steps", "0", "--num_threads", "1",
                       "--push_to_hub", "me/sami-tiny"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert hub.created == [{"repo_id": "me/sami-tiny", "private": None}]
    assert (out / "checkpoint-1").is_dir() and not any(f.startswith("checkpoint-") for f in hub.files)
    assert hub.cards[0].data.library_name == "sami-adapter" and hub.cards[0].data.to_dict().get("base_model") is None
    assert 'from_pretrained("me/sami-tiny")' in hub.cards[0].text
