"""examples/benchmark.py runs end to end with tiny flags and writes complete results."""

import json

from scripts import load_example


def test_benchmark_tiny_run_writes_all_variants(tmp_path):
    benchmark = load_example("benchmark")
    out = tmp_path / "bench"
    results = benchmark.main([
        "--sizes", "demo", "--num_inference_steps", "2", "--sample_batch_size", "2", "--train_batch_size", "4",
        "--repeats", "1", "--warmup", "0", "--threads", "1", "--device", "cpu", "--no_progress", "--output_dir", str(out),
        "--encoder_channels", "32",
    ])
    with open(out / "benchmark.json") as f:
        saved = json.load(f)
    assert saved["sizes"].keys() == {"demo"} == results["sizes"].keys()
    assert saved["machine"]["torch"] and saved["machine"]["torch_threads"] == 1
    assert saved["sizes"]["demo"]["encoder_channels"] == [32] and saved["sizes"]["demo"]["encoder_params"] == 212_336  # one block

    sampling = saved["sizes"]["demo"]["sampling"]
    for key in ("guided_s_per_image", "unguided_s_per_image", "guided_over_unguided", "encode_images_per_s", "sample50_over_encode"):
        assert sampling[key] > 0, key
    assert set(sampling["passed"]) == {"guided_over_unguided", "sample50_over_encode"}

    training = saved["sizes"]["demo"]["training"]
    assert set(training["variants"]) == {"frozen", "lora", "joint", "plain"}
    for name, v in training["variants"].items():
        assert v["s_per_step"] > 0 and v["ratio_to_plain"] > 0, name
        assert v["peak_mb"] > 0 and v["trainable_params"] > 0, name
    assert training["variants"]["plain"]["ratio_to_plain"] == 1.0
    # The frozen adapter trains only the encoder; LoRA adds far fewer weights than the UNet has.
    assert training["variants"]["frozen"]["trainable_params"] == saved["sizes"]["demo"]["encoder_params"]
    assert training["variants"]["lora"]["trainable_params"] < training["variants"]["joint"]["trainable_params"]
    assert "adapter_over_plain" in training["passed"]

    table = (out / "benchmark.md").read_text()
    assert "| demo | frozen |" in table and "| demo | plain |" in table and "50-step sample / encode" in table


def test_benchmark_refuses_encoder_widths_the_encoder_cannot_build(capsys):
    benchmark = load_example("benchmark")
    try:
        benchmark.main(["--tiny", "--encoder_channels", "32,x"])
    except SystemExit as stop:
        assert stop.code == 2
    else:
        raise AssertionError("--encoder_channels 32,x was accepted")
    assert "--encoder_channels takes comma-separated multiples of 8" in capsys.readouterr().err
