"""Information profiles, axis discovery, baselines, the shared metric harness and the evaluate/compare scripts on tiny models."""

import json
import math
import os
import re

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from scripts import load_example
from tiny import tiny_pipeline

from sami_adapter.adapter import save_adapter
from sami_adapter.evaluation import active_dimensions, elbo_bits_per_dim
from sami_adapter.noise_levels import characteristic_noise_levels, factor_noise_levels, information_profile, noise_order_agreement
from sami_adapter.baselines import PDAE, BetaVAE, DiffAE, train_beta_vae, train_diffae
from sami_adapter.data import Disks, MovingDisks
from sami_adapter.guidance import alpha_sigma_from_alphas_cumprod
from sami_adapter.metrics import factor_alignment
from sami_adapter.representation import representation_metrics, trajectory_curvatures
from sami_adapter.plotting import plot_information_profile
from sami_adapter.report import flat_metrics, metrics_table_markdown, profile_table_markdown

TINY_ARCH = {"encoder_channels": (8, 16), "hidden_dim": 32, "norm_num_groups": 4}
TINY_METRICS = [
    "--num_train", "48", "--num_test", "24", "--dci_estimators", "3", "--factor_vae_train", "4", "--factor_vae_eval", "4",
    "--factor_vae_batch", "8", "--num_variance_estimate", "24", "--num_sequences", "3", "--num_frames", "4",
]


def _disks(n, seed=0):
    return Disks(num_samples=1, resolution=8).sample(n, np.random.default_rng(seed))


def _synthetic_profile(with_schedule=True):
    info = np.array(
        [
            [2.0, 1.0, 0.01, 1.0],
            [1.6, 0.9, 0.01, 0.4],
            [0.8, 0.7, 0.01, 0.6],
            [0.2, 0.6, 0.01, 0.1],
        ]
    )
    kl = np.ones_like(info)
    kl[:, 2] = 0.01  # dim 2 is inactive
    timesteps = np.array([0, 100, 200, 400])
    sched = DDPMScheduler()
    alpha, sigma = alpha_sigma_from_alphas_cumprod(sched.alphas_cumprod, torch.tensor(timesteps, dtype=torch.float64))
    sigma = sigma.numpy().copy()
    sigma[0] = 0.0
    profile = {"timesteps": timesteps, "information": info, "kl": kl, "sigma": sigma}
    if with_schedule:
        profile["alphas_cumprod"] = sched.alphas_cumprod.numpy()
    return profile


# ------------------------------------------------------------------------------- axis discovery
def test_characteristic_noise_levels_interpolates_the_first_crossing():
    profile = _synthetic_profile()
    levels = characteristic_noise_levels(profile, fraction=0.5)
    assert levels["active"] == [0, 1, 3]
    # dim 0: threshold 1.0 crossed between t=100 (1.6) and t=200 (0.8): 100 + 0.6/0.8 * 100.
    assert levels["timestep"][0] == pytest.approx(175.0)
    # dim 3: first crossing between t=0 (1.0) and t=100 (0.4), although it comes back above later.
    assert levels["timestep"][3] == pytest.approx(100 * 0.5 / 0.6)
    # dim 1 keeps more than half up to the last level: censored; dim 2 is inactive.
    assert math.isnan(levels["timestep"][1]) and levels["censored"][1]
    assert math.isnan(levels["timestep"][2]) and not levels["censored"][2]
    assert levels["order"] == [3, 0, 1]
    # Noise scale at the fractional t*: exact from alphas_cumprod.
    a, s = alpha_sigma_from_alphas_cumprod(DDPMScheduler().alphas_cumprod, torch.tensor([175.0], dtype=torch.float64))
    assert levels["sigma"][0] == pytest.approx(float(s[0]))
    assert levels["log_snr"][0] == pytest.approx(math.log(float(a[0]) ** 2 / float(s[0]) ** 2))
    # Another fraction: threshold 0.5 for dim 0 is crossed between t=200 (0.8) and t=400 (0.2).
    assert characteristic_noise_levels(profile, fraction=0.25)["timestep"][0] == pytest.approx(300.0)
    # Without the schedule the noise scale is interpolated on the grid.
    plain = characteristic_noise_levels(_synthetic_profile(with_schedule=False))
    assert plain["sigma"][0] == pytest.approx(np.interp(175.0, profile["timesteps"], profile["sigma"]))
    # An explicit active set overrides the KL rule.
    assert characteristic_noise_levels(profile, active=[0])["active"] == [0]
    assert active_dimensions([0.5, 0.05, 0.2]) == [0, 2]
    table = profile_table_markdown(profile, levels)
    assert "175.0" in table and "> 400" in table
    with pytest.raises(ValueError):
        characteristic_noise_levels(profile, fraction=1.5)


def test_information_profile_shapes_and_definition(tmp_path):
    pipe = tiny_pipeline()
    images, _, _ = _disks(12)
    profile = information_profile(pipe, images, timesteps=[500, 100], generator=torch.Generator().manual_seed(0), batch_size=5)
    assert profile["timesteps"].tolist() == [0, 100, 500]  # 0 added, sorted
    for key in ("information", "explained_variance", "mean_variance", "posterior_variance", "kl"):
        assert profile[key].shape == (3, 3) and np.isfinite(profile[key]).all()
    assert (profile["information"] >= 0).all() and (profile["explained_variance"] <= 1).all()
    assert profile["sigma"][0] == 0 and math.isinf(profile["snr"][0])
    # The clean row is the Gaussian capacity of the clean posteriors.
    post = pipe.encode((images + 1) / 2)  # the datasets yield [-1, 1]; the pipeline takes [0, 1], as diffusers
    var_mu = post.mean.double().var(0).numpy()
    mean_var = post.var.double().mean(0).numpy()
    np.testing.assert_allclose(profile["information"][0], 0.5 * np.log1p(var_mu / mean_var), rtol=1e-5)
    np.testing.assert_allclose(profile["kl"][0], post.kl_per_dim().double().mean(0).numpy(), rtol=1e-5)
    levels = characteristic_noise_levels(profile, active=[0, 1, 2])
    path = plot_information_profile(profile, str(tmp_path / "profile.png"), levels, labels=["a", "b", "c"])
    assert os.path.getsize(path) > 0


def test_factor_alignment_and_noise_order():
    rng = np.random.default_rng(0)
    values = rng.random((200, 3))
    codes = np.stack([values[:, 1] ** 3, -2 * values[:, 0], np.zeros(200)], axis=1)
    alignment = factor_alignment(codes, values, ["a", "b", "c"])
    assert alignment["best_factor"][:2] == ["b", "a"]
    assert alignment["matrix"][0, 1] == pytest.approx(1.0) and alignment["matrix"][1, 0] == pytest.approx(1.0)
    assert (alignment["matrix"][2] == 0).all()  # a constant dimension correlates with nothing
    levels = {"timestep": np.array([300.0, 100.0, np.nan]), "active": [0, 1]}
    per_factor = factor_noise_levels(levels, alignment)
    assert per_factor["b"] == 300.0 and per_factor["a"] == 100.0 and math.isnan(per_factor["c"])
    same = noise_order_agreement(per_factor, {"a": 50.0, "b": 90.0, "c": 10.0})
    assert same["same_order"] and same["kendall_tau"] == pytest.approx(1.0) and same["factors"] == ["a", "b"]
    assert not noise_order_agreement(per_factor, {"a": 95.0, "b": 90.0})["same_order"]


# ------------------------------------------------------------------------------- baselines
def test_baselines_train_and_encode(tmp_path):
    data = Disks(num_samples=1, resolution=8)
    pixels, _, _ = _disks(5, seed=1)
    images = (pixels + 1) / 2  # the models take [0, 1] images, as the pipeline does
    vae = train_beta_vae(data, beta=4.0, latent_dim=3, max_steps=2, batch_size=8, progress=False, **TINY_ARCH)
    assert vae.training_log["steps"] == 2 and vae.encode(images).mean.shape == (5, 3)
    torch.testing.assert_close(vae.encode(images).mean, vae.encoder(pixels, 0).mean)  # [0, 1] in, the encoder sees [-1, 1]
    assert vae.reconstruct(images, output_type="pt").images.shape == images.shape
    vae.save_pretrained(str(tmp_path / "vae"))
    torch.testing.assert_close(BetaVAE.from_pretrained(str(tmp_path / "vae")).encode(images).mean, vae.encode(images).mean)
    assert vae.encoder.config.stem_stride == 2
    # the stem stride follows the SAMI encoder being compared with, through save/load too
    vae1 = train_beta_vae(data, beta=4.0, latent_dim=3, max_steps=1, batch_size=8, progress=False, encoder_stem_stride=1, **TINY_ARCH)
    vae1.save_pretrained(str(tmp_path / "vae1"))
    assert BetaVAE.from_pretrained(str(tmp_path / "vae1")).encoder.config.stem_stride == 1
    dae = train_diffae(data, latent_dim=3, max_steps=2, batch_size=8, progress=False, unet_channels=(8, 16), unet_norm_num_groups=4,
                       encoder_stem_stride=1, **TINY_ARCH)
    assert dae.encoder.config.stem_stride == 1
    assert dae.training_log["steps"] == 2 and dae.encode(images).mean.shape == (5, 3)
    assert dae.reconstruct(images, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images.shape == images.shape
    dae.save_pretrained(str(tmp_path / "dae"))
    torch.testing.assert_close(DiffAE.from_pretrained(str(tmp_path / "dae")).encode(images).mean, dae.encode(images).mean)


def test_pipeline_and_baselines_take_the_same_calls():
    """encode, reconstruct and generation are one call for SAMI, the β-VAE, DiffAE and PDAE: [0, 1] in, [0, 1] out."""
    data = Disks(num_samples=1, resolution=8)
    images = (_disks(4, seed=2)[0] + 1) / 2
    vae = train_beta_vae(data, latent_dim=3, max_steps=1, batch_size=8, progress=False, **TINY_ARCH)
    dae = train_diffae(data, latent_dim=3, max_steps=1, batch_size=8, progress=False, unet_channels=(8, 16), unet_norm_num_groups=4,
                       **TINY_ARCH)
    pipe = tiny_pipeline()
    pdae = PDAE.from_base(pipe.unet, pipe.scheduler, latent_dim=3, **TINY_ARCH)
    for model in (pipe, vae, dae, pdae):
        assert model.encode(images).mean.shape == (4, 3)
        out = model.reconstruct(images, generator=torch.Generator().manual_seed(0), num_inference_steps=2, eta=1.0, output_type="pt").images
        again = model.reconstruct(images, generator=torch.Generator().manual_seed(0), num_inference_steps=2, eta=1.0, output_type="pt").images
        assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
        torch.testing.assert_close(out, again)  # the generator fixes every draw
        samples = model(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="pt").images
        assert samples.shape == (3, *images.shape[1:])
    # DiffAE's DDIM takes eta: from the same initial noise, eta 1's fresh noise changes the decode
    decodes = [dae.reconstruct(images, generator=torch.Generator().manual_seed(1), num_inference_steps=2, eta=eta, output_type="pt").images
               for eta in (0.0, 1.0)]
    assert not torch.allclose(*decodes)


# ------------------------------------------------------------------------------- harness
def test_representation_metrics_and_curvature_keys():
    data = Disks(num_samples=1, resolution=8)
    weights = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    encode = lambda images: images.flatten(1) @ weights  # noqa: E731 - a fixed random projection
    result = representation_metrics(encode, data, num_train=48, num_test=24, dci_estimators=3, factor_vae_train=4, factor_vae_eval=4,
                                     factor_vae_batch=8, num_variance_estimate=24)
    for key in ("mig", "sap", "modularity", "explicitness"):
        assert np.isfinite(result[key])
    assert set(result["dci"]) == {"disentanglement", "completeness", "informativeness_train", "informativeness_test"}
    assert set(result["factor_vae"]) >= {"train_accuracy", "eval_accuracy"}
    assert list(result["linear_r2"]) == ["x", "y", "radius", "brightness"]
    assert result["alignment"]["matrix"].shape == (4, 4) and result["latent_dim"] == 4
    result["trajectories"] = trajectory_curvatures(encode, MovingDisks(num_sequences=3, num_frames=4, resolution=8))
    assert 0 <= result["trajectories"]["latent"] <= 180 and 0 <= result["trajectories"]["pixels"] <= 180
    table = metrics_table_markdown({"random": flat_metrics(result), "twice": [flat_metrics(result), flat_metrics(result)]})
    assert "| MIG |" in table and "±" in table and "trajectory curvature, latent (deg)" in table


def test_elbo_bits_per_dim_units():
    pipe = tiny_pipeline()
    images, _, _ = _disks(3)
    out = elbo_bits_per_dim(pipe, images, timesteps_per_image=2, batch_size=4)
    assert out["num_images"] == 3 and out["num_pixels"] == 64
    assert np.isfinite(out["bpd"]) and np.isfinite(out["unguided_bpd"]) and out["kl_nats"] > 0
    # the value itself is checked against a closed form in test_bound.py


# ------------------------------------------------------------------------------- scripts
@pytest.fixture
def tiny_adapters(tmp_path):
    base = tmp_path / "base"
    dirs = []
    for k in range(2):
        torch.manual_seed(k)
        pipe = tiny_pipeline()
        if k == 0:
            pipe.unet.save_pretrained(str(base / "unet"))
            DDPMScheduler().save_pretrained(str(base / "scheduler"))
        dirs.append(save_adapter(str(tmp_path / f"adapter{k}"), pipe.encoder, base_model_name_or_path=str(base),
                                 extra={"metrics": {"train_seconds": 1.0}, "training": {"dataset": "disks"}}))
    return dirs


def test_evaluate_script_end_to_end(tiny_adapters, tmp_path):
    out = tmp_path / "report"
    report = load_example("evaluate").main([
        tiny_adapters[0], "--output_dir", str(out), "--num_images", "12", "--num_inference_steps", "2", "--num_reconstructions", "3",
        "--num_samples", "2", "--traversal_steps", "3", "--num_noise_levels", "4", "--elbo_images", "3", "--elbo_timesteps", "2",
        "--num_threads", "1", "--sami_scale", "2", "--probe_steps", "20", *TINY_METRICS,
    ])
    text = (out / "report.md").read_text()
    for needle in ("sami_scale 2;", "| MIG |", "DCI disentanglement", "linear R² x", "bits/dim", "trajectory curvature", "t* (0.5 of I_i(0))",
                   "## The mechanism", "| MIG x |", "noise scale of the factor"):
        assert needle in text
    for png in ("reconstructions.png", "traversals.png", "information_profile.png", "samples.png", "mechanism.png"):
        assert (out / png).stat().st_size > 0
    saved = json.loads((out / "report.json").read_text())  # strict JSON: no NaN/Infinity tokens
    assert saved["dataset"] == "disks" and saved["trajectories"] is not None and report["latent_dim"] == 3
    assert len(saved["axis_discovery"]["profile"]["timesteps"]) == 4


def test_compare_script_end_to_end(tiny_adapters, tmp_path):
    out = tmp_path / "compare"
    summary = load_example("compare").main([
        "--sami_adapter", *tiny_adapters, "--output_dir", str(out), "--seeds", "0", "--baselines", "beta-vae:beta=4", "diffae", "pdae:lr=1e-3",
        "--max_steps", "2", "--batch_size", "8", "--save_models",
        "--diffae_unet_channels", "8,16", "--num_images", "12", "--num_noise_levels", "4", "--num_inference_steps", "2",
        "--num_reconstructions", "3", "--no_trajectories", "--no_progress", "--num_threads", "1", *TINY_METRICS,
    ])
    assert summary["budget_seconds"] == 1.0  # taken from the first adapter's train_seconds
    assert set(summary["table"]) == {"SAMI", "β-VAE (β=4)", "DiffAE", "PDAE (lr=0.001)"}
    # PDAE sits on the first adapter's own base, and every table and picture takes it
    assert summary["pdae_base"] == os.path.join(os.path.dirname(tiny_adapters[0]), "base") and summary["reconstruction_rows"][-1] == "PDAE (lr=0.001)"
    saved = PDAE.from_pretrained(str(out / "models" / "PDAE-lr0.001-seed0"))
    assert saved.config.base_model == summary["pdae_base"]
    assert summary["table"]["SAMI"]["MIG"]["n"] == 2 and summary["noise_order_agreement"] is not None
    text = (out / "compare.md").read_text()
    assert "| metric | SAMI | β-VAE (β=4) | DiffAE | PDAE (lr=0.001) |" in text and "stem stride 2" in text
    assert f"on the frozen base `{summary['pdae_base']}`" in text
    json.loads((out / "compare.json").read_text())
    assert (out / "reconstructions.png").exists() and (out / "metrics.png").exists()


def test_parse_baseline_specs():
    compare = load_example("compare")
    spec = compare.parse_baseline("capacity-vae:capacity=5,gamma=50")
    assert spec["label"] == "capacity β-VAE (capacity=5,gamma=50)" and spec["params"] == {"capacity": 5.0, "gamma": 50.0}
    assert compare.parse_baseline("beta-vae:beta=4")["label"] == "β-VAE (β=4)"
    control = compare.baseline_rate_control("beta-tcvae", {"tc_weight": 5.0})
    assert control.tc_estimator == "minibatch" and control.tc_weight == 5.0
    paper = compare.parse_baseline("beta-tcvae:beta=1,likelihood=gaussian,bias_free=1")
    assert paper["params"] == {"beta": 1.0, "likelihood": "gaussian", "bias_free": 1.0}
    assert paper["label"] == "β-TCVAE (β=1,likelihood=gaussian,bias_free=1)"
    assert compare.parse_baseline("pdae")["label"] == "PDAE" and compare.parse_baseline("pdae:lr=5e-4")["params"] == {"lr": 5e-4}
    for bad, message in [("vae:beta=1", "unknown baseline 'vae'"),
                         ("beta-vae:capacity=3", "beta-vae takes ['beta', 'bias_free', 'likelihood'], got ['capacity']"),
                         ("capacity-vae:beta=1", "capacity-vae needs capacity=<nats>"), ("beta-vae:beta", "is not key=value"),
                         ("beta-vae:likelihood=laplace", "likelihood must be bernoulli or gaussian, got 'laplace'"),
                         ("pdae:beta=2", "pdae takes ['lr', 'snr_gamma'], got ['beta']")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            compare.parse_baseline(bad)
    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "ddpm-disks-16")
    with pytest.raises(SystemExit, match=re.escape(f"PDAE's base {shipped} is a 16 px model and this comparison runs at 8 px")):
        compare.main(["--baselines", "pdae", "--resolution", "8", "--pdae_base", shipped, "--num_threads", "1"])


def test_rate_study_runs_and_collects(tiny_adapters, tmp_path):
    compare = load_example("compare")
    study = ["--rate_study", "--rate_images", "24", "--num_prior_samples", "4", "--num_images", "12", "--num_noise_levels", "3",
             "--num_inference_steps", "2", "--no_trajectories", "--no_progress", "--num_threads", "1", "--batch_size", "8", *TINY_METRICS]
    compare.main(["--sami_adapter", tiny_adapters[0], "--method", "SAMI tiny", "--setting", "C=1", "--baselines",
                  "--output_dir", str(tmp_path / "sami"), *study])
    compare.main(["--baselines", "beta-vae:beta=1", "capacity-vae:capacity=2,ramp=2", "beta-tcvae:tc_weight=2", "factor-vae:tc_weight=2",
                  "--seeds", "0", "--max_steps", "3", "--output_dir", str(tmp_path / "base"), *study])
    rate_sweep = load_example("rate_sweep")
    summary = rate_sweep.main(["--collect", str(tmp_path / "sami"), str(tmp_path / "base"), "--output_dir", str(tmp_path / "all")])
    methods = {row["method"] for row in summary["table"]}
    assert methods == {"SAMI tiny", "β-VAE", "capacity β-VAE", "β-TCVAE", "FactorVAE"}
    sami = next(row for row in summary["table"] if row["method"] == "SAMI tiny")
    assert sami["guidance gain"] is not None and 0 <= sami["prior clean fraction"]["mean"] <= 1
    for row in summary["rows"]:
        assert row["information_lower"] <= math.log(24) + 1e-9 and row["information_upper"] >= -1e-6
    text = (tmp_path / "all" / "rate_study.md").read_text()
    assert "| SAMI tiny | C=1 | 1 |" in text and "![metrics against rate](rate_disks.png)" in text
    assert (tmp_path / "all" / "rate_disks.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="does not exist"):
        rate_sweep.main(["--collect", str(tmp_path / "nowhere")])


def test_paper_study_collects_the_mechanism_and_traversals(tmp_path):
    """A tiny paper-recipe adapter and a saved β-VAE on background_disks, laid out as rate_sweep.py --grid paper does."""
    from accelerate.state import AcceleratorState

    finetune, compare, paper_study = load_example("finetune"), load_example("compare"), load_example("paper_study")
    sweep = tmp_path / "sweep"
    adapter = sweep / "adapters" / "background_disks-sami-paper-s0"
    AcceleratorState._reset_state(reset_partial_state=True)
    finetune.main(["--recipe", "paper", "--dataset", "background_disks", "--output_dir", str(adapter), "--resolution", "8",
                   "--train_batch_size", "4", "--latent_dim", "3", "--encoder_channels", "8,16", "--report_to", "none",
                   "--max_train_steps", "3", "--no_report", "--num_threads", "1"])
    AcceleratorState._reset_state(reset_partial_state=True)
    study = ["--rate_study", "--dataset", "background_disks", "--rate_images", "24", "--num_prior_samples", "4", "--num_images", "12",
             "--num_noise_levels", "3", "--num_inference_steps", "2", "--no_trajectories", "--no_progress", "--num_threads", "1",
             "--batch_size", "8", *TINY_METRICS]
    compare.main(["--sami_adapter", str(adapter), "--method", "SAMI paper", "--setting", "joint", "--baselines",
                  "--output_dir", str(sweep / "runs" / "background_disks-sami-paper-s0"), *study])
    compare.main(["--baselines", "beta-vae:beta=1,likelihood=gaussian,bias_free=1", "--seeds", "0", "--max_steps", "3", "--save_models",
                  "--latent_dim", "3", "--resolution", "8", "--output_dir", str(sweep / "runs" / "background_disks-bvae1-gaussian-s0"), *study])
    out = tmp_path / "docs"
    result = paper_study.main([str(sweep), "--output_dir", str(out), "--probe_steps", "3", "--num_noise_levels", "3", "--traversal_steps", "3"])
    assert {(t["method"], t["n"]) for t in result["table"]} == {("SAMI paper", 1), ("β-VAE", 1)}
    sami = next(r for r in result["rows"] if r["method"] == "SAMI paper")
    assert set(sami["mechanism"]["factor_noise_scales"]) == {"x", "y", "background"}
    assert {"MIG x", "MIG y", "MIG background", "R² background", "reconstruction MSE"} <= set(sami["values"])
    text = (out / "paper_study.md").read_text()
    assert "| SAMI paper (joint) | 1 |" in text and "mechanism-background_disks-sami-paper-s0.png" in text
    for name in ("mechanism-background_disks-sami-paper-s0.png", "traversals-background_disks-sami-paper-s0.png",
                 "traversals-background_disks-bvae1-gaussian-s0.png", "paper_study.json"):
        assert (out / name).stat().st_size > 0, name
    # The probe depends on the data and the schedule only: a second collection can reuse it, scales unchanged.
    again = paper_study.main([str(sweep), "--output_dir", str(tmp_path / "again"), "--reuse_probe", str(out / "paper_study.json"),
                              "--probe_steps", "1000000", "--traversal_steps", "3"])
    assert again["scales"] == result["scales"]
