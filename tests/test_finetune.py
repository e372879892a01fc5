"""examples/finetune.py end to end on tiny models: modes, resume, errors, DDP."""

import hashlib
import json
import os
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from scripts import launch_two_processes, load_example
from tiny import finetune_args as _args

from sami_adapter import SAMIPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


finetune = load_example("finetune")


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _encoder_weights(out):
    return load_file(os.path.join(out, "encoder", "diffusion_pytorch_model.safetensors"))


def _tree_digest(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(p.encode())
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_frozen_run_writes_a_loadable_adapter_without_base_weights(base_dir, tmp_path):
    out = tmp_path / "adapter"
    finetune.main(_args(base_dir, out, "--max_train_steps", "3"))
    config = json.loads((out / "sami_adapter_config.json").read_text())
    assert config["unet_mode"] == "frozen" and config["latent_dim"] == 3
    assert not (out / "unet").exists() and not (out / "unet_lora").exists()
    report = json.loads((out / "report" / "report.json").read_text())
    assert {"guided_loss", "unguided_loss", "kl_per_dim", "reconstruction_r2", "reconstruction_r2_scaled"} <= set(report)
    assert report["reconstruction_sami_scale"] == 3.0 and set(report["reconstruction_r2_scaled"]) == {"x", "y", "radius", "brightness"}
    assert (out / "report" / "traversals.png").exists() and (out / "README.md").exists()
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3] and "kl_dim_2" in log[0] and "guidance_gain" in log[0]
    pipe = SAMIPipeline.from_pretrained(str(out))
    assert pipe.encoder.config.latent_dim == 3
    pipe.set_progress_bar_config(disable=True)
    assert pipe(batch_size=1, num_inference_steps=2, output_type="pt").images.shape == (1, 1, 8, 8)


def test_resume_is_bit_identical(base_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    finetune.main(_args(base_dir, straight, "--max_train_steps", "4", "--checkpointing_steps", "2", "--no_report"))
    assert (straight / "checkpoint-2").is_dir()
    # a run killed after step 2 leaves exactly that checkpoint behind
    os.makedirs(resumed)
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    finetune.main(_args(base_dir, resumed, "--max_train_steps", "4", "--checkpointing_steps", "2", "--no_report",
                        "--resume_from_checkpoint", "latest"))
    a, b = _encoder_weights(straight), _encoder_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_or_mismatched_checkpoint_fails_clearly_and_changes_nothing(base_dir, tmp_path):
    out = tmp_path / "run"
    finetune.main(_args(base_dir, out, "--max_train_steps", "3", "--checkpointing_steps", "2", "--no_report"))
    weights = out / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = _tree_digest(out)
    with pytest.raises(SystemExit, match="truncated or corrupt"):
        finetune.main(_args(base_dir, out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", "--no_report"))
    assert _tree_digest(out) == before
    with pytest.raises(SystemExit, match="another setup"):
        finetune.main(_args(base_dir, out, "--max_train_steps", "4", "--latent_dim", "5", "--no_report",
                            "--resume_from_checkpoint", str(out / "checkpoint-2")))
    assert _tree_digest(out) == before


def test_lora_mode_saves_lora_weights_that_change_the_unet(base_dir, tmp_path):
    out = tmp_path / "lora"
    finetune.main(_args(base_dir, out, "--max_train_steps", "2", "--unet_mode", "lora", "--lora_rank", "2",
                        "--unet_learning_rate", "0.05", "--checkpointing_steps", "1", "--no_report"))
    assert sorted(os.listdir(out / "unet_lora")) == ["adapter_config.json", "adapter_model.safetensors"] and not (out / "unet").exists()
    checkpoint = load_file(str(out / "checkpoint-1" / "model.safetensors"))  # LoRA and encoder only, not the base UNet
    unet_keys = [k for k in checkpoint if "unet" in k]
    assert unet_keys and all("lora_" in k for k in unet_keys) and any(k.startswith("encoder.") for k in checkpoint)
    resumed = tmp_path / "lora-resumed"  # and it resumes: the base weights come from the base model
    shutil.copytree(out / "checkpoint-1", resumed / "checkpoint-1")
    finetune.main(_args(base_dir, resumed, "--max_train_steps", "2", "--unet_mode", "lora", "--lora_rank", "2",
                        "--unet_learning_rate", "0.05", "--checkpointing_steps", "1", "--no_report", "--resume_from_checkpoint", "latest"))
    a, b = (load_file(str(d / "unet_lora" / "adapter_model.safetensors")) for d in (out, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pipe = SAMIPipeline.from_pretrained(str(out))  # LoRA merged into a plain UNet
    from diffusers import UNet2DModel

    base = UNet2DModel.from_pretrained(base_dir, subfolder="unet")
    assert not any("lora" in k or "base_layer" in k for k in pipe.unet.state_dict())
    diff = max((pipe.unet.state_dict()[k] - v).abs().max().item() for k, v in base.state_dict().items())
    assert diff > 0
    unmerged = SAMIPipeline.from_pretrained(str(out), merge_lora=False)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    torch.testing.assert_close(unmerged.unet(x, t).sample, pipe.unet(x, t).sample, atol=1e-5, rtol=1e-5)


def test_full_mode_from_scratch_saves_its_unet(tmp_path):
    out = tmp_path / "joint"
    finetune.main(["--unet_mode", "full", "--output_dir", str(out), "--resolution", "8", "--train_batch_size", "2", "--latent_dim", "2",
                   "--encoder_channels", "8,16", "--encoder_hidden_dim", "24", "--report_to", "none", "--max_train_steps", "1", "--no_report",
                   "--mixed_precision", "bf16", "--num_threads", "1"])
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    pipe = SAMIPipeline.from_pretrained(str(out))
    assert pipe.unet.config.sample_size == 8 and pipe.encoder.config.hidden_dim == 24


def test_image_folder_errors(base_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no images found"):
        finetune.main(_args(base_dir, tmp_path / "o1", "--train_data_dir", str(empty), "--max_train_steps", "1"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        finetune.main(_args(base_dir, tmp_path / "o2", "--train_data_dir", str(bad), "--max_train_steps", "1"))
    with pytest.raises(SystemExit):
        finetune.parse_args(["--push_to_hub"])
    with pytest.raises(SystemExit):
        finetune.parse_args(["--unet_mode", "sideways"])


def test_image_folder_training(base_dir, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.fromarray((torch.rand(12, 10) * 255).byte().numpy()).save(folder / f"{i}.png")
    out = tmp_path / "o"
    finetune.main(_args(base_dir, out, "--train_data_dir", str(folder), "--max_train_steps", "2", "--random_flip"))
    assert (out / "report" / "reconstructions.png").exists()


def test_two_process_ddp_matches_one_process_at_twice_the_batch(base_dir, tmp_path):
    """gloo DDP on CPU: the double backward goes through DDP; both ranks end with the same weights."""
    common = ["--max_train_steps", "3", "--no_report"]  # the default flags, free bits included
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    ddp_args = _args(base_dir, ddp_out, *common)
    ddp_args[ddp_args.index("--train_batch_size") + 1] = "2"
    launch_two_processes(ddp_args, tmp_path / "ddp.log")
    assert (ddp_out / "sami_adapter_config.json").exists()
    finetune.main(_args(base_dir, single_out, *common))
    config = json.loads((ddp_out / "sami_adapter_config.json").read_text())
    checksums = config["metrics"]["rank_weight_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    a, b = _encoder_weights(ddp_out), _encoder_weights(single_out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- nothing silent, nothing lost
ADAPTER_PARTS = ("sami_adapter_config.json", "encoder", "unet_lora", "unet", "README.md")


def _adapter_digest(out):
    return {p: _tree_digest(os.path.join(out, p)) if os.path.isdir(os.path.join(out, p)) else hashlib.sha256(open(os.path.join(out, p), "rb").read()).hexdigest()
            for p in ADAPTER_PARTS if os.path.exists(os.path.join(out, p))}


def test_diverged_run_stops_naming_the_step_and_keeps_the_previous_adapter_byte_identical(base_dir, tmp_path):
    out = tmp_path / "run"
    finetune.main(_args(base_dir, out, "--max_train_steps", "2", "--no_report"))
    before = _adapter_digest(out)
    assert "encoder" in before and "sami_adapter_config.json" in before
    with pytest.raises(SystemExit) as stop:
        finetune.main(_args(base_dir, out, "--max_train_steps", "8", "--learning_rate", "1e6", "--lr_scheduler", "constant",
                            "--checkpointing_steps", "1", "--overwrite_output_dir"))
    message = stop.value.code
    assert isinstance(message, str), "a string exit code means exit status 1"  # sys.exit(str) exits non-zero
    assert "diverged at step" in message and "--learning_rate" in message
    assert _adapter_digest(out) == before
    for name in finetune.checkpoint_dirs(out):  # checkpoints written before the divergence hold finite weights
        for key, value in load_file(os.path.join(out, name, "model.safetensors")).items():
            assert torch.isfinite(value).all(), (name, key)


def test_an_earlier_run_is_refused_unless_overwrite_output_dir_and_then_cleared(base_dir, tmp_path, capsys):
    out = tmp_path / "run"
    finetune.main(_args(base_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    assert (out / "checkpoint-1").is_dir() and (out / "report" / "report.json").exists()
    before = _tree_digest(out)
    with pytest.raises(SystemExit):
        finetune.main(_args(base_dir, out, "--max_train_steps", "3", "--latent_dim", "2"))
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite_output_dir" in err
    assert _tree_digest(out) == before
    (out / "report" / "stale.png").write_bytes(b"from the old run")
    finetune.main(_args(base_dir, out, "--max_train_steps", "3", "--latent_dim", "2", "--overwrite_output_dir"))
    assert json.loads((out / "sami_adapter_config.json").read_text())["latent_dim"] == 2
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3]  # the old run's log lines are gone, not appended to
    assert not (out / "checkpoint-1").exists() and not (out / "report" / "stale.png").exists()
    assert len(json.loads((out / "report" / "report.json").read_text())["kl_per_dim"]) == 2


@pytest.mark.parametrize("flag, value, named", [
    ("--num_inference_steps", "0", "--num_inference_steps must be an integer >= 1"),
    ("--learning_rate", "0", "--learning_rate must be a finite number > 0"),
    ("--beta", "nan", "--beta must be a finite number >= 0"),
    ("--free_bits", "-1", "--free_bits must be a finite number >= 0"),
    ("--resolution", "0", "--resolution must be an integer >= 1"),
    ("--checkpointing_steps", "0", "--checkpointing_steps must be an integer >= 1"),
    ("--beta", "0.1,-1", "--beta must be two finite numbers >= 0, got '0.1,-1.0'"),
    ("--num_eval_images", "0", "--num_eval_images must be an integer >= 1"),
    ("--lr_scheduler", "cosnie", "--lr_scheduler must be one of"),
    ("--encoder_channels", "8,x", "--encoder_channels must be comma-separated multiples of 8"),
    ("--encoder_hidden_dim", "0", "--encoder_hidden_dim must be an integer >= 1, got 0"),
])
def test_every_flag_is_checked_before_anything_runs(base_dir, tmp_path, capsys, flag, value, named):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as stop:
        finetune.main(_args(base_dir, out, "--max_train_steps", "1", flag, value))
    assert stop.value.code == 2  # argparse's usage error
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_the_adapter_is_saved_before_the_report_is_made(base_dir, tmp_path, monkeypatch):
    """An evaluation that fails after training still leaves the trained adapter."""
    out = tmp_path / "run"

    def failing_report(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(finetune, "write_report", failing_report)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        finetune.main(_args(base_dir, out, "--max_train_steps", "2"))
    assert SAMIPipeline.from_pretrained(str(out)).encoder.config.latent_dim == 3


def test_gradient_accumulation_matches_one_step_at_the_whole_batch_with_default_flags(base_dir, tmp_path):
    """2 micro-batches of 2 see the same images, noise and free-bits threshold as one batch of 4."""
    accumulated, whole = tmp_path / "accumulated", tmp_path / "whole"
    finetune.main(_args(base_dir, accumulated, "--max_train_steps", "3", "--no_report", "--gradient_accumulation_steps", "2",
                        "--train_batch_size", "2"))
    finetune.main(_args(base_dir, whole, "--max_train_steps", "3", "--no_report"))
    a, b = _encoder_weights(accumulated), _encoder_weights(whole)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if k.startswith("head."))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


RATE_FLAGS = ("--beta", "0", "--free_bits", "0", "--capacity", "2", "--capacity_ramp_steps", "2", "--mismatch_weight", "1",
              "--tc_weight", "1", "--tc_on", "mean", "--intervention_weight", "1", "--noise_bands", "nested")


def test_rate_flags_log_every_term_and_resume_bit_identically(base_dir, tmp_path):
    """Capacity on the information, mismatch, a TC discriminator (its state is part of the checkpoint),
    the intervention loss and nested noise bands, together."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    finetune.main(_args(base_dir, straight, "--max_train_steps", "4", "--checkpointing_steps", "2", "--no_report", *RATE_FLAGS))
    logs = [json.loads(line) for line in open(straight / "logs" / "train_log.jsonl")]
    for key in ("information_upper", "mismatch", "mismatch_dim_0", "mismatch_dim_2", "tc", "capacity", "intervention", "discriminator_loss"):
        assert all(key in entry for entry in logs), key
    assert [entry["capacity"] for entry in logs[:2]] == [1.0, 2.0]  # the ramp
    os.makedirs(resumed)
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    finetune.main(_args(base_dir, resumed, "--max_train_steps", "4", "--checkpointing_steps", "2", "--no_report", *RATE_FLAGS,
                        "--resume_from_checkpoint", "latest"))
    a, b = _encoder_weights(straight), _encoder_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pipe = SAMIPipeline.from_pretrained(str(straight))
    assert pipe.encoder.config.guidance_bands == [1000.0, 2000 / 3, 1000 / 3]
    assert pipe(batch_size=2, num_inference_steps=2, output_type="pt").images.shape == (2, 1, 8, 8)


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--noise_bands", "500,250"), "--noise_bands needs one upper timestep per latent dimension (3), got 2"),
        (("--noise_bands", "wide"), "--noise_bands must be 'nested' or comma-separated timesteps, got 'wide'"),
        (("--capacity", "-1"), "capacity must be a finite number of nats >= 0, got -1.0."),
        (("--intervention_weight", "-1"), "--intervention_weight must be a finite number >= 0, got -1.0"),
    ],
)
def test_rate_flag_errors(base_dir, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        finetune.parse_args(_args(base_dir, tmp_path / "x", *flags))
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_with_a_discriminator_is_refused_by_a_run_without_one(base_dir, tmp_path):
    out = tmp_path / "run"
    finetune.main(_args(base_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "1", "--no_report", "--tc_weight", "1"))
    before = _tree_digest(out)
    with pytest.raises(SystemExit, match="tc_discriminator: checkpoint True vs now None"):
        finetune.main(_args(base_dir, out, "--max_train_steps", "3", "--no_report", "--resume_from_checkpoint", str(out / "checkpoint-1")))
    assert _tree_digest(out) == before


def test_paper_recipe_sets_its_defaults_and_explicit_flags_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --output_dir is relative: a run in the checkout must not make this fail
    args = finetune.parse_args(["--dataset", "background_disks"])  # the dataset's default recipe
    assert args.recipe == "paper" and args.unet_mode == "full" and args.pretrained_model_name_or_path is None
    assert args.encoder_type == "paper" and args.timestep_sampling == "uniform" and args.use_ema
    assert args.free_bits == 0 and args.latent_noise_warmup_steps == 0 and args.max_grad_norm == 1.0
    # The paper's per-pixel-mean KL weights times the pixel count (this script sums the error over pixels).
    assert args.beta == pytest.approx(5e-6 * 256) and args.beta_final == pytest.approx(1e-4 * 256)
    assert finetune.parse_args(["--recipe", "paper", "--resolution", "32"]).beta == pytest.approx(5e-6 * 1024)
    explicit = finetune.parse_args(["--dataset", "background_disks", "--beta", "0.5", "--free_bits", "0.25"])
    assert explicit.beta == 0.5 and explicit.free_bits == 0.25 and explicit.beta_final is None  # --beta sets the whole schedule
    ramp = finetune.parse_args(["--beta", "0.003,0.1"])
    assert (ramp.beta, ramp.beta_final) == (0.003, 0.1)
    default = finetune.parse_args([])
    assert default.recipe == "adapter" and default.unet_mode == "frozen" and default.beta == 0.01 and default.encoder_type == "timed"
    frozen = finetune.parse_args(["--recipe", "adapter", "--dataset", "background_disks"])  # the shipped base of that dataset
    assert frozen.pretrained_model_name_or_path.endswith(os.path.join("models", "ddpm-background-disks-16"))
    assert "paper: --unet_mode full" in finetune.recipe_help()
    digits = finetune.parse_args(["--dataset", "digits"])  # real images: the images recipe and the shipped digits base
    assert digits.recipe == "images" and digits.timestep_sampling == "mid" and digits.unet_mode == "frozen" and digits.beta == 0.01
    assert digits.pretrained_model_name_or_path.endswith(os.path.join("models", "ddpm-digits-16"))
    assert finetune.parse_args(["--recipe", "images"]).timestep_sampling == "mid"  # the preset for image folders


def test_encoder_type_builds_the_encoder_it_names(base_dir, tmp_path):
    for encoder_type, expected in (("time_blind", (False, False)), ("paper", (False, True))):
        out = tmp_path / encoder_type
        finetune.main(_args(base_dir, out, "--max_train_steps", "1", "--no_report", "--encoder_type", encoder_type))
        config = json.loads((out / "encoder" / "config.json").read_text())
        assert (config["time_conditioning"], config["bias_free"]) == expected, encoder_type


def test_paper_recipe_trains_from_scratch_and_loads_with_the_paper_encoder(tmp_path):
    out = tmp_path / "paper"
    finetune.main(["--recipe", "paper", "--dataset", "background_disks", "--output_dir", str(out), "--resolution", "8",
                   "--train_batch_size", "2", "--latent_dim", "2", "--encoder_channels", "8,16", "--report_to", "none",
                   "--max_train_steps", "2", "--num_eval_images", "4", "--num_inference_steps", "2", "--num_threads", "1"])
    pipe = SAMIPipeline.from_pretrained(str(out))
    assert pipe.encoder.config.bias_free and not pipe.encoder.config.time_conditioning
    report = json.loads((out / "report" / "report.json").read_text())
    assert set(report["reconstruction_r2"]) == {"x", "y", "background"}


def test_warm_start_from_a_baseline_encoder_with_an_annealed_anchor(base_dir, tmp_path):
    """--init_encoder takes a saved β-VAE's encoder (its architecture included): at step 0 the
    adapter's encoder is the baseline's; the anchor, at full weight, keeps the clean code close to
    it, and a run without the anchor moves further; per-dimension capacities and a ramp start ride along."""
    from sami_adapter.baselines.beta_vae import BetaVAE

    torch.manual_seed(0)
    vae = BetaVAE(in_channels=1, sample_size=8, latent_dim=3, encoder_channels=(8, 16), hidden_dim=16, encoder_bias_free=True)
    with torch.no_grad():
        vae.encoder.head.weight.normal_(0, 0.3)
    vae.save_pretrained(tmp_path / "btcvae")
    rate = ("--beta", "0", "--free_bits", "0", "--capacity", "2,1,0.5", "--capacity_ramp_steps", "4", "--capacity_start", "0.5")
    runs = {}
    for name, extra in (("anchored", ("--anchor_steps", "100", "--anchor_weight", "1000")), ("free", ())):
        out = tmp_path / name
        finetune.main(_args(base_dir, out, "--max_train_steps", "3", "--no_report", "--learning_rate", "1e-2",
                            "--init_encoder", str(tmp_path / "btcvae"), *rate, *extra))
        runs[name] = SAMIPipeline.from_pretrained(str(out)).encoder
        logs = [json.loads(line) for line in open(out / "logs" / "train_log.jsonl")]
        assert [round(entry["capacity"], 4) for entry in logs[:2]] == [2.1875, 2.625]  # 3.5 * (0.5 + 0.5 * (s + 1) / 4)
    assert runs["free"].config.bias_free and not runs["free"].config.time_conditioning
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    zero = torch.zeros(16, dtype=torch.long)
    with torch.no_grad():
        start = vae.encoder(x, zero).mean
        moved = {k: float((enc(x, zero).mean - start).pow(2).sum(1).mean()) for k, enc in runs.items()}
    assert 0 < moved["anchored"] < moved["free"], moved


def test_init_encoder_errors(base_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(_args(base_dir, tmp_path / "x", "--anchor_steps", "5"))
    assert "--anchor_steps needs --init_encoder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.parse_args(_args(base_dir, tmp_path / "x", "--capacity", "1,2"))
    assert "--capacity has 2 per-dimension targets but --latent_dim is 3" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit, match="is neither an adapter"):
        finetune.main(_args(base_dir, tmp_path / "y", "--init_encoder", str(tmp_path / "empty"), "--max_train_steps", "1", "--no_report"))
