"""examples/finetune.py on the user's own data: `datasets` sources, captions, the per-process data loader,
precision and memory flags, and the conveniences (checkpoint names, logging dir, validation images in
tensorboard). Offline: every dataset is made here."""

import json
import os
import shutil
import time

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from scripts import launch_two_processes, load_example
from tiny import finetune_args as _args
from tiny import tiny_unet

from sami_adapter import SAMIPipeline, sami_loss
from sami_adapter.hf_data import load_split, source_problem
from sami_adapter.training import ImageDataset, StepBatches, StepItems, StepShardSampler

finetune = load_example("finetune")


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _encoder_weights(out):
    return load_file(os.path.join(out, "encoder", "diffusion_pytorch_model.safetensors"))


def _assert_same_weights(a_dir, b_dir):
    a, b = _encoder_weights(a_dir), _encoder_weights(b_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _grey_images(n, size=(12, 10), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)) for _ in range(n)]


def _image_folder(path, n=6, captions=True):
    """An imagefolder: PNGs and a metadata.jsonl with a `text` column."""
    path.mkdir(parents=True)
    lines = []
    for i, image in enumerate(_grey_images(n)):
        image.save(path / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a picture number {i}"}))
    if captions:
        (path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- sources
def test_imagefolder_reads_metadata_captions_and_decodes_each_image_exactly(tmp_path):
    folder = _image_folder(tmp_path / "imgs")
    table = load_split(data_dir=str(folder))
    assert set(table.column_names) == {"image", "text"} and len(table) == 6
    data = ImageDataset.from_datasets(table, "image", 8, 1, caption_column="text", center_crop=True)
    rng = np.random.default_rng(0)
    for i in range(len(data)):
        path = table.cast_column("image", datasets.Image(decode=False))[i]["image"]["path"]
        expected = ImageDataset([path], 8, 1, center_crop=True).load(0, np.random.default_rng(0))
        assert torch.equal(data.load(i, rng), expected)
        assert data.caption(i, rng) == f"a picture number {os.path.basename(path)[:-4]}"


def test_dataset_name_trains_on_a_local_parquet_folder(base_dir, tmp_path):
    folder = tmp_path / "parquet"
    folder.mkdir()
    images = _grey_images(5, size=(8, 8), seed=1)
    datasets.Dataset.from_dict({"img": images, "label": list(range(5))}).cast_column("img", datasets.Image()).to_parquet(
        str(folder / "train.parquet"))
    table = load_split(str(folder))
    loaded = ImageDataset.from_datasets(table, "img", 8, 1, center_crop=True)
    for i, image in enumerate(images):  # 8 px in, 8 px out: no resampling, so the pixels come back exactly
        want = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)[None]
        assert torch.equal(loaded.load(i, np.random.default_rng(0)), want)
    out, cache = tmp_path / "o", tmp_path / "cache"
    finetune.main(_args(base_dir, out, "--dataset_name", str(folder), "--image_column", "img", "--max_train_steps", "2", "--no_report",
                        "--cache_dir", str(cache)))
    config = json.loads((out / "sami_adapter_config.json").read_text())
    assert config["training"]["dataset_name"] == str(folder)
    assert any(f.endswith(".arrow") for _, _, files in os.walk(cache) for f in files)  # --cache_dir holds the prepared data


def test_dataset_name_reads_an_imagefolder_with_its_metadata(base_dir, tmp_path):
    folder = _image_folder(tmp_path / "imgs")
    assert set(load_split(str(folder)).column_names) == {"image", "text"}
    out = tmp_path / "o"
    finetune.main(_args(base_dir, out, "--dataset_name", str(folder), "--max_train_steps", "2", "--no_report"))
    assert len((out / "logs" / "train_log.jsonl").read_text().splitlines()) == 2


def test_a_save_to_disk_folder_is_detected_and_its_train_split_used(base_dir, tmp_path):
    saved = tmp_path / "saved"
    train = datasets.Dataset.from_dict({"image": _grey_images(4)}).cast_column("image", datasets.Image())
    other = datasets.Dataset.from_dict({"image": _grey_images(1)}).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": train, "test": other}).save_to_disk(str(saved))
    assert source_problem(str(saved)) is None and len(load_split(str(saved))) == 4
    assert len(ImageDataset.from_saved_dataset(str(saved), "image", 8, 1)) == 4
    out = tmp_path / "o"
    finetune.main(_args(base_dir, out, "--dataset_name", str(saved), "--max_train_steps", "2", "--no_report"))
    assert (out / "encoder" / "diffusion_pytorch_model.safetensors").exists()


@pytest.mark.parametrize("flags, named", [
    (("--dataset_name", "./no/such/folder"), "--dataset_name takes a Hub dataset id, a local dataset folder or a save_to_disk folder: "
                                             "'./no/such/folder' is neither an existing folder nor a Hub dataset id"),
    (("--dataset_name", "EMPTY"), "`datasets` cannot read the folder"),
    (("--dataset_name", "FILE"), "is a file; pass a folder"),
    (("--dataset_name", "IMGS", "--dataset_config_name", "nope"), "--dataset_config_name names a configuration of --dataset_name: "
                                                                  "'IMGS_PATH' has no configuration 'nope'"),
    (("--caption_column", "text"), "--caption_column needs --dataset_name or --train_data_dir"),
    (("--dataset_config_name", "small"), "--dataset_config_name needs --dataset_name"),
    (("--dataloader_num_workers", "-1"), "--dataloader_num_workers must be an integer >= 0, got -1"),
    (("--checkpoints_total_limit", "-1"), "--checkpoints_total_limit must be an integer >= 0, got -1"),
    (("--train_data_dir", "IMGS", "--caption_column", "text", "--proportion_empty_prompts", "1.5"),
     "--proportion_empty_prompts must be in [0, 1], got 1.5"),
    (("--train_data_dir", "IMGS", "--proportion_empty_prompts", "0.2"), "--proportion_empty_prompts needs --caption_column"),
    (("--resume_from_checkpoint", "checkpoint-9"), "--resume_from_checkpoint 'checkpoint-9' is neither a checkpoint in --output_dir"),
])
def test_data_and_run_flags_are_refused_before_anything_loads(base_dir, tmp_path, capsys, flags, named):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    _image_folder(tmp_path / "imgs")
    where = {"EMPTY": str(tmp_path / "empty"), "FILE": str(tmp_path / "file.txt"), "IMGS": str(tmp_path / "imgs")}
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as stop:
        finetune.main(_args(base_dir, out, "--max_train_steps", "1", *[where.get(f, f) for f in flags]))
    assert stop.value.code == 2  # argparse's usage error, from check_args
    assert named.replace("IMGS_PATH", where["IMGS"]) in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("offline", [False, True])
def test_an_unknown_hub_dataset_is_refused_quickly_naming_the_flag(base_dir, tmp_path, capsys, monkeypatch, offline):
    """No network here: online, the one Hub look-up fails at once (or within its 10 s limit); offline, only the cache is asked."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)
    out = tmp_path / "never"
    start = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        # a base that does not exist: a model loaded before the data check would fail with another message
        finetune.main(_args(str(tmp_path / "no-model"), out, "--dataset_name", "sami-nobody/no-such-dataset", "--max_train_steps", "1"))
    assert time.monotonic() - start < 20
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--dataset_name takes a Hub dataset id" in err and "'sami-nobody/no-such-dataset'" in err
    assert ("is not in the local datasets cache" if offline else "could not reach the Hub") in err
    assert not out.exists()


def test_a_missing_column_is_refused_before_the_model_loads(tmp_path):
    folder = _image_folder(tmp_path / "imgs")
    with pytest.raises(SystemExit, match=r"--image_column 'picture' is not a column of .* \(columns: image, text\); pass --image_column"):
        finetune.main(_args(str(tmp_path / "no-model"), tmp_path / "o", "--train_data_dir", str(folder), "--image_column", "picture",
                            "--max_train_steps", "1"))


def test_captions_need_a_text_conditioned_unet(base_dir, tmp_path):
    folder = _image_folder(tmp_path / "imgs")
    with pytest.raises(SystemExit, match="--caption_column 'text': this UNet is not text-conditioned"):
        finetune.main(_args(base_dir, tmp_path / "o", "--train_data_dir", str(folder), "--caption_column", "text", "--max_train_steps", "1"))


def test_a_text_conditioned_base_trains_on_its_captions(tmp_path):
    """Captions reach the UNet: the same run with every prompt emptied learns other weights; the share is seeded."""
    from test_latent_diffusion import PIXEL_SIZE, tiny_cond_unet, tiny_text, tiny_vae
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    text_encoder, tokenizer = tiny_text()
    base = tmp_path / "tiny-sd"
    StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_cond_unet(),
                            scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(base)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (PIXEL_SIZE, PIXEL_SIZE, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "caption": ["a red square", "a blue disk"][i % 2]}) + "\n")

    def run(name, *flags):
        out = tmp_path / name
        finetune.main(["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(folder), "--resolution", str(PIXEL_SIZE),
                       "--latent_dim", "2", "--encoder_channels", "8,16", "--train_batch_size", "2", "--max_train_steps", "3",
                       "--report_to", "none", "--output_dir", str(out), "--validation_steps", "0", "--num_threads", "1", "--no_report",
                       "--lr_scheduler", "constant", "--latent_noise_warmup_steps", "0", *flags])
        return out

    captioned = run("captioned", "--caption_column", "caption")
    emptied = run("emptied", "--caption_column", "caption", "--proportion_empty_prompts", "1")
    plain = run("plain")
    a, b, c = _encoder_weights(captioned), _encoder_weights(emptied), _encoder_weights(plain)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the captions changed the UNet's conditioning
    assert all(torch.equal(b[k], c[k]) for k in b)  # all prompts emptied = the empty-prompt run, exactly


def test_empty_prompt_share_is_a_function_of_seed_step_and_position(tmp_path):
    folder = _image_folder(tmp_path / "imgs", n=8)
    data = ImageDataset.from_datasets(load_split(data_dir=str(folder)), "image", 8, 1, caption_column="text")
    batches = StepBatches(data, 64, seed=1, empty_prompt_share=0.25)
    captions = [batches.item(k, p, int(i))["caption"] for k in range(4) for p, i in enumerate(batches.indices(k))]
    share = sum(c == "" for c in captions) / len(captions)
    assert 0.15 < share < 0.35 and all(c == "" or c.startswith("a picture number") for c in captions)
    again = StepBatches(data, 64, seed=1, empty_prompt_share=0.25)
    assert [again.item(3, p, int(i))["caption"] for p, i in enumerate(again.indices(3))] == captions[-64:]


# ---------------------------------------------------------------- the data loader and determinism
def test_each_process_shard_together_is_the_one_process_batch(tmp_path):
    """StepShardSampler: the ranks' micro-batches, concatenated in the training loop's order, are one process's batch."""
    folder = _image_folder(tmp_path / "imgs", n=5)
    data = ImageDataset.from_datasets(load_split(data_dir=str(folder)), "image", 8, 1, random_flip=True)
    world, accumulation, batch = 2, 2, 3
    batches = StepBatches(data, world * accumulation * batch, seed=4)
    shards = [list(StepShardSampler(batches, 2, 5, batch, accumulation, rank, world)) for rank in range(world)]
    single = list(StepShardSampler(batches, 2, 5, world * accumulation * batch))
    assert len(single) == 3 and all(len(s) == 3 * accumulation for s in shards)
    for step in range(3):
        joined = [key for micro in range(accumulation) for rank in range(world) for key in shards[rank][step * accumulation + micro]]
        assert joined == single[step]
    items = StepItems(batches)
    key = shards[1][1][0]  # rank 1's item decodes exactly as the same key in the single-process batch
    assert torch.equal(items[key]["pixel_values"], StepItems(StepBatches(data, 12, seed=4))[key]["pixel_values"])
    with pytest.raises(ValueError, match="not batch_size x accumulation x world"):
        StepShardSampler(batches, 0, 1, batch_size=2, accumulation=2, rank=0, world=2)


def test_workers_and_resume_by_name_are_bit_identical_on_file_data(base_dir, tmp_path):
    """--dataloader_num_workers 2, killed after step 2 and resumed by checkpoint name, ends as the uninterrupted
    run and as the run with 0 workers, with random crops and flips."""
    folder = _image_folder(tmp_path / "imgs", n=7)
    common = ("--train_data_dir", str(folder), "--random_flip", "--max_train_steps", "4", "--checkpointing_steps", "2", "--no_report")
    straight, resumed, inline = tmp_path / "straight", tmp_path / "resumed", tmp_path / "inline"
    finetune.main(_args(base_dir, straight, *common, "--dataloader_num_workers", "2"))
    os.makedirs(resumed)
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    finetune.main(_args(base_dir, resumed, *common, "--dataloader_num_workers", "2", "--resume_from_checkpoint", "checkpoint-2"))
    finetune.main(_args(base_dir, inline, *common, "--dataloader_num_workers", "0"))
    _assert_same_weights(straight, resumed)
    _assert_same_weights(straight, inline)
    log = [json.loads(line) for line in (resumed / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [3, 4]  # resumed at step 2 of --output_dir's checkpoint-2


# ---------------------------------------------------------------- precision and memory
def test_gradient_checkpointing_gives_the_same_encoder_gradients_through_the_double_backward():
    from diffusers import DDPMScheduler

    from tiny import tiny_encoder

    torch.manual_seed(0)
    unet, encoder = tiny_unet().eval().requires_grad_(False), tiny_encoder()
    with torch.no_grad():
        encoder.head.weight.normal_(0, 0.3)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x = torch.rand(4, 1, 8, 8) * 2 - 1

    def grads():
        encoder.zero_grad()
        sami_loss(unet, encoder, scheduler, x, generator=torch.Generator().manual_seed(1)).loss.backward()
        return [p.grad.clone() for p in encoder.parameters()]

    plain = grads()
    encoder.enable_gradient_checkpointing()
    assert encoder.gradient_checkpointing
    checkpointed = grads()
    assert any(g.abs().sum() > 0 for g in plain[:4])  # gradients reach the checkpointed blocks
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bf16_run_with_gradient_checkpointing_saves_a_loadable_adapter_and_logs_validation_images(base_dir, tmp_path):
    """20 bf16 steps on CPU with checkpointing (mixed precision allows TF32); validation images reach tensorboard under --logging_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "bf16"
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        finetune.main(_args(base_dir, out, "--max_train_steps", "20", "--mixed_precision", "bf16", "--gradient_checkpointing",
                            "--unet_mode", "lora", "--lora_rank", "2", "--validation_steps", "10",
                            "--report_to", "tensorboard", "--logging_dir", "tb", "--logging_steps", "5"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    config = json.loads((out / "sami_adapter_config.json").read_text())
    assert config["metrics"]["mixed_precision"] == "bf16"
    assert all(np.isfinite(v) for v in config["metrics"]["kl_per_dim"])
    pipe = SAMIPipeline.from_pretrained(str(out))
    assert pipe.unet.dtype == torch.float32 and pipe.encoder.dtype == torch.float32
    assert pipe(batch_size=1, num_inference_steps=2, output_type="pt").images.shape == (1, 1, 8, 8)
    log = [json.loads(line) for line in (out / "tb" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [5, 10, 15, 20]
    assert (out / "validation" / "step-10.png").exists()
    runs = [root for root, _, files in os.walk(out / "tb") if any(f.startswith("events.out.tfevents") for f in files)]
    events = EventAccumulator(runs[0], size_guidance={"images": 0}).Reload()
    assert "validation" in events.Tags()["images"]
    image = events.Images("validation")[0]
    png = Image.open(out / "validation" / "step-10.png")
    assert image.step == 10 and (image.width, image.height) == png.size


def test_mixed_precision_defaults_to_the_accelerate_config(base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` / `accelerate config` set
    from accelerate.state import AcceleratorState

    finetune.main(_args(base_dir, tmp_path / "default", "--max_train_steps", "1", "--no_report"))
    AcceleratorState._reset_state(reset_partial_state=True)  # the second run starts like a new process
    finetune.main(_args(base_dir, tmp_path / "flag", "--max_train_steps", "1", "--no_report", "--mixed_precision", "no"))
    precision = {name: json.loads((tmp_path / name / "sami_adapter_config.json").read_text())["metrics"]["mixed_precision"]
                 for name in ("default", "flag")}
    assert precision == {"default": "bf16", "flag": "no"}


def test_every_new_flag_is_in_help(capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--dataset_name", "--dataset_config_name", "--cache_dir", "--image_column", "--caption_column",
                 "--proportion_empty_prompts", "--dataloader_num_workers", "--mixed_precision", "--gradient_checkpointing",
                 "--resume_from_checkpoint", "--logging_dir"):
        assert flag in text, flag


def test_two_processes_with_workers_match_one_process_on_file_data(base_dir, tmp_path):
    """gloo DDP on CPU, each rank decoding only its own shard in a worker: the weights equal one process at twice the batch."""
    folder = _image_folder(tmp_path / "imgs", n=7)
    common = ("--train_data_dir", str(folder), "--random_flip", "--max_train_steps", "3", "--no_report")
    ddp_args = _args(base_dir, tmp_path / "ddp", *common, "--dataloader_num_workers", "1")
    ddp_args[ddp_args.index("--train_batch_size") + 1] = "2"
    launch_two_processes(ddp_args, tmp_path / "ddp.log")
    finetune.main(_args(base_dir, tmp_path / "single", *common))
    a, b = _encoder_weights(tmp_path / "ddp"), _encoder_weights(tmp_path / "single")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("unet_mode, precision, unet_dtype", [
    ("frozen", "bf16", torch.bfloat16), ("lora", "bf16", torch.bfloat16), ("full", "bf16", torch.float32), ("frozen", "no", torch.float32),
])
def test_frozen_modules_are_cast_to_the_mixed_precision_dtype(unet_mode, precision, unet_dtype):
    from accelerate import Accelerator
    from test_latent_diffusion import tiny_text, tiny_vae

    text_encoder, tokenizer = tiny_text()
    components = {"vae": tiny_vae(), "text_encoder": text_encoder, "tokenizer": tokenizer}
    unet = tiny_unet()
    args = finetune.parse_args(["--unet_mode", unet_mode, "--mixed_precision", precision, "--output_dir", "unused", "--report_to", "none"])
    dtype = finetune.setup_precision_and_memory(args, Accelerator(mixed_precision=precision, cpu=True), unet, components)
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert dtype == want and components["vae"].dtype == want and components["text_encoder"].dtype == want
    assert unet.dtype == unet_dtype


def test_checkpoints_total_limit_zero_keeps_every_checkpoint(base_dir, tmp_path):
    out = tmp_path / "keep"
    finetune.main(_args(base_dir, out, "--max_train_steps", "4", "--checkpointing_steps", "1", "--checkpoints_total_limit", "0", "--no_report"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    limited = tmp_path / "limited"
    finetune.main(_args(base_dir, limited, "--max_train_steps", "4", "--checkpointing_steps", "1", "--no_report"))
    assert sorted(p.name for p in limited.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
