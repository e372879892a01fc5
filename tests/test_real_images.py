"""The tools on real and user images: `--dataset digits` through evaluate.py, compare.py, finetune.py and the explorer
(the fixed held-out split, the usefulness for the class), evaluate.py --label_column on an image folder with a
metadata.jsonl, and pretrain_unet.py on an image folder. Tiny models; offline."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image
from safetensors.torch import load_file
from scripts import load_example
from tiny import finetune_args, tiny_pipeline

from sami_adapter import SAMIPipeline
from sami_adapter.adapter import save_adapter
from sami_adapter.data import Disks, digit_split
from sami_adapter.hf_data import load_split
from sami_adapter.usefulness import labelled_usefulness

METRICS = ["--num_images", "12", "--num_inference_steps", "2", "--num_reconstructions", "3", "--num_noise_levels", "4", "--num_threads", "1",
           "--num_train", "48", "--num_test", "24", "--dci_estimators", "3", "--factor_vae_train", "4", "--factor_vae_eval", "4",
           "--factor_vae_batch", "8", "--num_variance_estimate", "24"]
FAST = METRICS + ["--num_samples", "2", "--traversal_steps", "3", "--elbo_images", "3", "--elbo_timesteps", "2", "--probe_steps", "0"]


@pytest.fixture
def tiny_adapter(tmp_path):
    """A tiny 8 px grey adapter (random encoder head) on a tiny base, recorded as trained on digits."""
    torch.manual_seed(0)
    pipe = tiny_pipeline()
    base = tmp_path / "base"
    pipe.unet.save_pretrained(str(base / "unet"))
    DDPMScheduler().save_pretrained(str(base / "scheduler"))
    return save_adapter(str(tmp_path / "adapter"), pipe.encoder, base_model_name_or_path=str(base),
                        extra={"metrics": {"train_seconds": 1.0}, "training": {"dataset": "digits", "seed": 0}})


def _labelled_folder(path, n=60):
    """``n`` 8 px PNGs of two kinds, disks and their negatives ("holes"), alternating, with a metadata.jsonl `kind` column."""
    path.mkdir(parents=True)
    disks = Disks(n // 2, resolution=8, seed=4).arrays()[0][:, 0]
    lines = []
    for i in range(n):
        pixels = disks[i // 2] if i % 2 == 0 else -disks[i // 2]
        Image.fromarray(((pixels + 1) * 127.5).round().astype("uint8")).save(path / f"{i:02d}.png")
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "kind": "disk" if i % 2 == 0 else "hole"}))
    (path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_evaluate_on_digits_reports_the_usefulness_for_the_class(tiny_adapter):
    out = os.path.join(tiny_adapter, "evaluation")
    report = load_example("evaluate").main([tiny_adapter, "--output_dir", out, *FAST])  # the dataset: the adapter's, digits
    use = report["usefulness"]
    assert report["dataset"] == "digits" and "fixed held-out split" in report["data"] and report["trajectories"] is None
    assert (use["num_train"], use["num_test"], use["num_classes"], use["latent_dim"]) == (1438, 359, 10, 3)
    assert set(use["attributes"]) == {"ink", "slant", "width", "height"} and set(use["references"]) == {"pca", "pixels"}
    assert use["references"]["pixels"]["linear_probe"] > 0.9  # the probe reads real digits from their pixels
    for key in ("linear_probe", "linear_probe_cv5", "knn", "knn_cv5"):
        assert 0.0 <= use[key] <= 1.0
    held_out = torch.from_numpy(digit_split("test", 8)[0]).flatten(1)
    saved = json.load(open(os.path.join(out, "report.json")))
    assert saved["usefulness"]["linear_probe"] == use["linear_probe"] and saved["num_images"] == 12
    text = open(os.path.join(out, "report.md")).read()
    assert "## Usefulness for the label" in text and "| kNN, k=5 (held-out acc.) |" in text and "PCA of the pixels (3)" in text
    card = open(os.path.join(tiny_adapter, "README.md")).read()  # evaluation/ is the adapter's: its card shows the numbers
    assert f"linear probe {use['linear_probe']:.3f} (5-fold CV {use['linear_probe_cv5']:.3f})" in card
    # the explorer's examples of a digits adapter are held-out scans
    from sami_adapter.explorer import load_examples

    pipe = SAMIPipeline.from_pretrained(tiny_adapter)
    examples = load_examples({"training": {"dataset": "digits", "seed": 0}}, pipe, 6)
    assert examples.shape == (6, 1, 8, 8)
    assert torch.cdist(examples.flatten(1) * 2 - 1, held_out).min(dim=1).values.max() < 1e-5  # each one a test scan


def test_evaluate_label_column_on_an_image_folder(tiny_adapter, tmp_path):
    folder = _labelled_folder(tmp_path / "kinds")
    out = os.path.join(tiny_adapter, "evaluation")
    evaluate = load_example("evaluate")
    report = evaluate.main([tiny_adapter, "--train_data_dir", str(folder), "--label_column", "kind", "--output_dir", out, *FAST])
    use = report["usefulness"]
    assert (use["num_train"], use["num_test"], use["num_classes"], use["majority_class"], use["label"]) == (48, 12, 2, 0.5, "kind")
    assert report["metrics"] is None and report["mechanism"] is None and report["dataset"] == "kinds"
    # the same numbers from the PNGs read directly (8 px in, 8 px out: no resampling) and the table's labels
    table = load_split(data_dir=str(folder))
    paths = [row["image"]["path"] for row in table.cast_column("image", __import__("datasets").Image(decode=False))]
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255.0)[None] for p in paths])
    pipe = SAMIPipeline.from_pretrained(tiny_adapter)
    with torch.no_grad():
        codes = pipe.encode(pixels).mean.double().numpy()
    direct = labelled_usefulness(codes, np.asarray(table["kind"]), 0.2, seed=0)
    for key in ("linear_probe", "linear_probe_cv5", "knn", "knn_cv5"):
        assert use[key] == pytest.approx(direct[key], abs=1e-12), key
    text = open(os.path.join(out, "report.md")).read()
    assert "Label: kind; 2 classes" in text and "a fixed class-stratified 20% of the images, drawn with seed 0" in text
    assert "## Metrics" in text and "MIG" not in text
    card = open(os.path.join(tiny_adapter, "README.md")).read()
    assert f"usefulness for the label (kind; 2 classes, 12 held-out images): linear probe {use['linear_probe']:.3f}" in card


def test_evaluate_label_column_errors(tiny_adapter, tmp_path, capsys):
    folder = _labelled_folder(tmp_path / "kinds", n=20)
    evaluate = load_example("evaluate")
    with pytest.raises(SystemExit, match="--label_column 'nope' is not a column of .* \\(columns: image, kind\\)"):
        evaluate.main([tiny_adapter, "--train_data_dir", str(folder), "--label_column", "nope", *FAST])
    with pytest.raises(SystemExit) as stop:
        evaluate.main([tiny_adapter, "--label_column", "kind", *FAST])
    assert stop.value.code == 2 and "--label_column needs --train_data_dir or --dataset_name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        evaluate.main([tiny_adapter, "--dataset", "disks", "--train_data_dir", str(folder), *FAST])
    assert stop.value.code == 2 and "use either --dataset or --train_data_dir / --dataset_name, not both" in capsys.readouterr().err
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[3] = json.dumps({"file_name": "03.png", "kind": None})
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match="--label_column 'kind': image 3 has no label"):
        evaluate.main([tiny_adapter, "--train_data_dir", str(folder), "--label_column", "kind", "--output_dir", str(tmp_path / "r"), *FAST])


def test_compare_on_digits_tables_the_usefulness_against_pca_and_pixels(tiny_adapter, tmp_path):
    out = tmp_path / "compare"
    summary = load_example("compare").main(["--sami_adapter", tiny_adapter, "--dataset", "digits", "--baselines", "--output_dir", str(out),
                                            "--no_trajectories", "--no_progress", *METRICS])
    sami = summary["runs"]["SAMI"][0]["usefulness"]
    assert (sami["num_train"], sami["num_test"]) == (1438, 359) and set(summary["usefulness_references"]) == {"pca", "pixels"}
    assert summary["table"]["SAMI"]["linear probe (held-out acc.)"]["mean"] == sami["linear_probe"]
    text = (out / "compare.md").read_text()
    assert "| metric | SAMI | PCA of the pixels (3) | raw pixels |" in text and "| linear probe (5-fold CV acc.) |" in text


def test_finetune_on_digits_holds_out_the_test_split_and_reports_the_usefulness(base_dir, tmp_path, fresh_accelerate_state):
    out = tmp_path / "digits"
    load_example("finetune").main(finetune_args(base_dir, out, "--dataset", "digits", "--max_train_steps", "2"))
    config = json.loads((out / "sami_adapter_config.json").read_text())
    use = config["metrics"]["usefulness"]
    assert (use["num_train"], use["num_test"], use["label"]) == (1438, 359, "digit class") and "reconstruction_r2" not in config["metrics"]
    assert "usefulness for the label (digit class; 10 classes, 359 held-out images)" in (out / "README.md").read_text()


def _pretrain(folder, out, *extra):
    load_example("pretrain_unet").main(["--train_data_dir", str(folder), "--output_dir", str(out), "--resolution", "8",
                                        "--block_out_channels", "8,16", "--max_train_steps", "20", "--train_batch_size", "8",
                                        "--lr_warmup_steps", "2", "--num_eval_samples", "4", "--num_inference_steps", "2", *extra])


def test_pretrain_unet_makes_a_base_from_an_image_folder(tmp_path, fresh_accelerate_state):
    """20 steps on 60 PNGs; every batch is a function of seed and step, so decoding in a worker process changes no weight."""
    folder = _labelled_folder(tmp_path / "kinds")
    _pretrain(folder, tmp_path / "a")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    _pretrain(folder, tmp_path / "b", "--dataloader_num_workers", "1")
    unet = UNet2DModel.from_pretrained(str(tmp_path / "a" / "unet"))
    assert (unet.config.in_channels, unet.config.sample_size, tuple(unet.config.block_out_channels)) == (1, 8, (8, 16))
    a = load_file(str(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "a" / "pretrain_report.json").read_text())
    assert report["data"] == {"source": str(folder), "images": 60, "channels": 1} and "clean_disk_fraction" not in report
    assert (tmp_path / "a" / "samples.png").stat().st_size > 0


def test_pretrain_unet_refuses_bad_data_flags(tmp_path, capsys):
    pretrain = load_example("pretrain_unet")
    with pytest.raises(SystemExit) as stop:
        pretrain.main(["--train_data_dir", str(tmp_path / "missing")])
    assert stop.value.code == 2 and f"--train_data_dir {str(tmp_path / 'missing')!r} is not a directory" in capsys.readouterr().err
