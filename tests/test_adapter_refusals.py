"""Loading an adapter never silently drops or guesses: unet=, unet_mode, moved folders, pickles, unmerged LoRA."""

import json
import os
import shutil

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file
from tiny import tiny_encoder, tiny_unet

from sami_adapter import SAMIPipeline
from sami_adapter.adapter import save_adapter
from sami_adapter.lora import add_lora


def _base(path):
    torch.manual_seed(0)
    tiny_unet().save_pretrained(os.path.join(path, "unet"))
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(os.path.join(path, "scheduler"))
    return path


def _encoder():
    torch.manual_seed(1)
    encoder = tiny_encoder()
    with torch.no_grad():
        encoder.head.weight.normal_(0, 0.3)
    return encoder


def _lora_adapter(tmp_path):
    base = _base(str(tmp_path / "base"))
    unet = UNet2DModel.from_pretrained(base, subfolder="unet")
    config = add_lora(unet, rank=2)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # peft starts B at zero: make the LoRA change the UNet
    return save_adapter(str(tmp_path / "lora"), _encoder(), base, unet=unet, unet_mode="lora", lora_config=config), base


def _output(pipe_or_unet):
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([10, 500])
    with torch.no_grad():
        return unet(x, t).sample


def test_unet_given_to_a_lora_adapter_gets_the_lora(tmp_path):
    adapter, base = _lora_adapter(tmp_path)
    loaded = SAMIPipeline.from_pretrained(adapter)
    given = SAMIPipeline.from_pretrained(adapter, unet=UNet2DModel.from_pretrained(base, subfolder="unet"))
    torch.testing.assert_close(_output(given), _output(loaded))
    plain = UNet2DModel.from_pretrained(base, subfolder="unet")
    with torch.no_grad():
        assert (_output(loaded) - plain(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([10, 500])).sample).abs().max() > 1e-3


def test_lora_is_saved_in_peft_format_and_loads_with_peft_model(tmp_path):
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter, base = _lora_adapter(tmp_path)
    lora_dir = os.path.join(adapter, "unet_lora")
    assert sorted(os.listdir(lora_dir)) == ["adapter_config.json", "adapter_model.safetensors"]  # no diffusers file: not text-conditioned
    loaded = SAMIPipeline.from_pretrained(adapter)
    peft_unet = PeftModel.from_pretrained(UNet2DModel.from_pretrained(base, subfolder="unet"), lora_dir)
    torch.testing.assert_close(_output(peft_unet), _output(loaded), atol=1e-5, rtol=1e-5)
    # set_peft_model_state_dict reads the same file into a PeftModel made from the config alone
    from peft import LoraConfig, get_peft_model

    fresh = get_peft_model(UNet2DModel.from_pretrained(base, subfolder="unet"), LoraConfig.from_pretrained(lora_dir))
    result = set_peft_model_state_dict(fresh, load_file(os.path.join(lora_dir, "adapter_model.safetensors")))
    assert not result.unexpected_keys
    torch.testing.assert_close(_output(fresh), _output(loaded), atol=1e-5, rtol=1e-5)
    assert get_peft_model_state_dict(fresh).keys() == get_peft_model_state_dict(peft_unet).keys()


def test_an_adapter_in_the_old_lora_layout_still_loads(tmp_path):
    """Before the peft format: raw peft keys in pytorch_lora_weights.safetensors + lora_config.json."""
    import json

    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    adapter, _ = _lora_adapter(tmp_path)
    new = SAMIPipeline.from_pretrained(adapter)
    lora_dir = os.path.join(adapter, "unet_lora")
    config = LoraConfig.from_pretrained(lora_dir)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(os.path.join(lora_dir, "adapter_model.safetensors")).items()}
    for name in os.listdir(lora_dir):
        os.remove(os.path.join(lora_dir, name))
    save_file(state, os.path.join(lora_dir, "pytorch_lora_weights.safetensors"))
    with open(os.path.join(lora_dir, "lora_config.json"), "w") as f:
        json.dump({"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}, f)
    torch.testing.assert_close(_output(SAMIPipeline.from_pretrained(adapter)), _output(new))
    os.remove(os.path.join(lora_dir, "lora_config.json"))
    with pytest.raises(ValueError, match=r"unet_lora holds no LoRA config \(adapter_config.json, or lora_config.json of older adapters\)"):
        SAMIPipeline.from_pretrained(adapter)


def test_unet_given_to_a_full_adapter_is_refused(tmp_path):
    base = _base(str(tmp_path / "base"))
    adapter = save_adapter(str(tmp_path / "full"), _encoder(), base, unet=tiny_unet(), unet_mode="full")
    with pytest.raises(ValueError, match="carries its own trained UNet.*Leave unet out"):
        SAMIPipeline.from_pretrained(adapter, unet=tiny_unet())


def test_unknown_unet_mode_is_refused(tmp_path):
    base = _base(str(tmp_path / "base"))
    adapter = save_adapter(str(tmp_path / "adapter"), _encoder(), base)
    path = os.path.join(adapter, "sami_adapter_config.json")
    config = json.load(open(path))
    config["unet_mode"] = "partial"
    json.dump(config, open(path, "w"))
    with pytest.raises(ValueError, match="unet_mode 'partial'; expected one of frozen, lora, full"):
        SAMIPipeline.from_pretrained(adapter)


def test_a_moved_adapter_still_finds_its_relative_base(tmp_path):
    base = _base(str(tmp_path / "models" / "base"))
    runs = tmp_path / "runs"
    runs.mkdir()
    adapter = save_adapter(str(runs / "adapter"), _encoder(), os.path.relpath(base, runs / "adapter"))
    assert json.load(open(os.path.join(adapter, "sami_adapter_config.json")))["base_model_name_or_path"] == "../../models/base"
    moved = tmp_path / "elsewhere" / "deeper" / "adapter"
    moved.parent.mkdir(parents=True)
    shutil.move(adapter, moved)
    pipe = SAMIPipeline.from_pretrained(str(moved))
    assert pipe.unet.config.sample_size == 8
    shutil.rmtree(base)  # a local base that is gone: a clear error, not a Hub lookup of "../../models/base"
    with pytest.raises(ValueError, match="local folder that is not there any more"):
        SAMIPipeline.from_pretrained(str(moved))


def test_pickled_weights_are_refused_unless_opted_in(tmp_path):
    base = _base(str(tmp_path / "base"))
    encoder = _encoder()
    adapter = save_adapter(str(tmp_path / "adapter"), encoder, base)
    folder = os.path.join(adapter, "encoder")
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    torch.save(state, os.path.join(folder, "diffusion_pytorch_model.bin"))
    os.remove(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=r"only as a pickle .*use_safetensors=False"):
        SAMIPipeline.from_pretrained(adapter)
    pipe = SAMIPipeline.from_pretrained(adapter, use_safetensors=False)
    torch.testing.assert_close(pipe.encoder.head.weight, encoder.head.weight)


def test_a_pipeline_with_unmerged_lora_saves_a_folder_that_loads_back(tmp_path):
    adapter, _ = _lora_adapter(tmp_path)
    unmerged = SAMIPipeline.from_pretrained(adapter, merge_lora=False)
    # By default a pipeline loaded from an adapter is saved as an adapter: LoRA only, no base UNet.
    unmerged.save_pretrained(tmp_path / "adapter-again")
    assert sorted(os.listdir(tmp_path / "adapter-again" / "unet_lora")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not (tmp_path / "adapter-again" / "unet").exists()
    torch.testing.assert_close(_output(SAMIPipeline.from_pretrained(tmp_path / "adapter-again")), _output(unmerged), atol=1e-5, rtol=1e-5)
    # save_base=True: the whole pipeline, the LoRA folded into a plain UNet.
    unmerged.save_pretrained(tmp_path / "saved", save_base=True)
    saved = load_file(tmp_path / "saved" / "unet" / "diffusion_pytorch_model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in saved)
    reloaded = SAMIPipeline.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(_output(reloaded), _output(unmerged), atol=1e-5, rtol=1e-5)
    assert any("lora" in k for k in unmerged.unet.state_dict())  # the pipeline itself is left as it was
