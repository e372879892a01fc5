"""Rate control: closed forms of the KL split, the capacity target that cannot be met by mismatch,
TC estimators that see a rotation, noise bands and the per-dimension intervention loss."""

import math

import pytest
import torch
from tiny import tiny_encoder, tiny_unet

from sami_adapter import RateControl, SAMIEncoder, nested_guidance_bands, posterior_score, sami_loss
from sami_adapter.rate import (
    TCDiscriminator,
    discriminator_loss,
    discriminator_step,
    information_upper_bound,
    minibatch_decomposition,
    mixture_information,
    moment_matched_kl,
    permute_dims,
    rate_terms,
)


def _gaussian_channel(n, signal_std, noise_std, dims=2, seed=0):
    """x ~ N(0, signal^2 I); q(z | x) = N(x, noise^2 I): I(x; z) = D/2 log(1 + signal^2 / noise^2)."""
    g = torch.Generator().manual_seed(seed)
    mean = signal_std * torch.randn(n, dims, generator=g, dtype=torch.float64)
    logvar = torch.full_like(mean, 2 * math.log(noise_std))
    return mean, logvar, dims / 2 * math.log(1 + signal_std**2 / noise_std**2)


def test_moment_matched_kl_closed_form():
    mean, logvar, _ = _gaussian_channel(200_000, 0.8, 0.5)
    var = 0.8**2 + 0.5**2  # aggregate N(0, (s^2 + n^2) I)
    expected = 2 * 0.5 * (var - 1 - math.log(var))
    assert float(moment_matched_kl(mean, logvar)) == pytest.approx(expected, abs=2e-3)
    per_dim = moment_matched_kl(mean, logvar, per_dim=True)
    assert per_dim.shape == (2,) and float(per_dim.sum()) == pytest.approx(expected, abs=2e-3)


def test_moment_matched_kl_sees_correlation_that_marginals_miss():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(100_000, 1, generator=g, dtype=torch.float64)
    mean = torch.cat([u, u], 1) * 0.9  # perfectly correlated means
    logvar = torch.full_like(mean, math.log(0.19))  # marginal variance 0.81 + 0.19 = 1
    assert float(moment_matched_kl(mean, logvar, per_dim=True).sum()) == pytest.approx(0.0, abs=1e-2)
    cov = torch.tensor([[1.0, 0.81], [0.81, 1.0]], dtype=torch.float64)  # KL = -1/2 log det = 0.53 nats
    assert float(moment_matched_kl(mean, logvar)) == pytest.approx(float(-0.5 * torch.logdet(cov)), abs=1e-2)


def test_information_bounds_bracket_a_gaussian_channel():
    mean, logvar, info = _gaussian_channel(4096, 1.0, 0.5)  # I = log 5 = 1.61 nats
    upper = float(information_upper_bound(mean, logvar))
    lower = mixture_information(mean, logvar, torch.Generator().manual_seed(1))
    assert upper == pytest.approx(info, abs=0.05)  # tight: the aggregate is Gaussian
    assert lower == pytest.approx(info, abs=0.1) and lower <= math.log(4096)


def test_information_upper_bound_is_zero_for_an_input_independent_posterior():
    mean = torch.full((64, 4), 1.3)
    logvar = torch.full((64, 4), -3.5)
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(1).mean()
    assert float(kl) > 5
    assert float(information_upper_bound(mean, logvar)) == pytest.approx(0.0, abs=1e-4)
    assert mixture_information(mean.double(), logvar.double(), torch.Generator().manual_seed(0)) == pytest.approx(0.0, abs=1e-9)


def test_capacity_on_information_cannot_be_met_by_mismatch():
    """The failure a KL capacity allows: a posterior that differs from the prior but not between inputs."""
    capacity = 6.0
    mean = torch.full((64, 4), 1.0, dtype=torch.float64)
    # KL per dimension (1 + s2 - 1 - log s2) / 2 = C / 4: bisect s2 - log s2 = C / 2 on (0, 1).
    lo, hi = 1e-9, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if mid - math.log(mid) < capacity / 2 else (mid, hi)
    logvar = torch.full((64, 4), math.log(lo), dtype=torch.float64)
    z = mean + logvar.mul(0.5).exp() * torch.randn(64, 4)
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(1).mean()
    assert float(kl) == pytest.approx(capacity, abs=1e-4)
    on_kl = rate_terms(RateControl(capacity=capacity, capacity_on="kl"), mean, logvar, z, kl)
    on_info = rate_terms(RateControl(capacity=capacity, capacity_on="information"), mean, logvar, z, kl)
    assert float(on_kl["loss"]) == pytest.approx(0.0, abs=1e-4)  # the old target is satisfied...
    assert float(on_info["loss"]) == pytest.approx(capacity, abs=1e-3)  # ...the information target is not
    assert float(on_info["mismatch"]) == pytest.approx(capacity, abs=1e-3)

    # An informative posterior with I = C meets it.
    info_mean, info_logvar, info = _gaussian_channel(4096, math.sqrt(math.expm1(capacity / 2)), 1.0)
    info_kl = 0.5 * (info_mean**2 + info_logvar.exp() - 1 - info_logvar).sum(1).mean()
    meets = rate_terms(RateControl(capacity=info, capacity_on="information"), info_mean, info_logvar, info_mean, info_kl)
    assert float(meets["loss"]) < 0.05 * capacity


def test_capacity_training_regression_input_independent_posterior():
    """The failure on a small case: when reading the input costs something (in SAMI, the guidance
    starts out hurting the denoiser; here a weight penalty), a KL capacity is met by an
    input-independent posterior. The information target cannot be met that way."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g)
    results = {}
    for on in ("kl", "information"):
        torch.manual_seed(0)
        weight = (1e-2 * torch.randn(6, 4)).requires_grad_(True)
        bias = torch.zeros(8, requires_grad=True)
        opt = torch.optim.Adam([weight, bias], lr=0.05)
        control = RateControl(capacity=3.0, capacity_on=on, mismatch_weight=1.0 if on == "information" else 0.0)
        for _ in range(400):
            mean = x @ weight + bias[:4]
            logvar = bias[4:].expand(256, 4)
            z = mean + (0.5 * logvar).exp() * torch.randn(256, 4, generator=g)
            kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(1).mean()
            loss = rate_terms(control, mean, logvar, z, kl)["loss"] + 0.05 * (weight**2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            mean = x @ weight + bias[:4]
            results[on] = (float(information_upper_bound(mean, bias[4:].expand(256, 4))), float(kl))
    assert results["kl"][1] == pytest.approx(3.0, abs=0.1) and results["kl"][0] < 0.1  # budget met by mismatch
    assert results["information"][0] == pytest.approx(3.0, abs=0.3)  # budget met by information


def test_minibatch_decomposition_sums_to_the_kl_estimate_and_sees_correlation():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(512, 3, generator=g, dtype=torch.float64)
    logvar = torch.full_like(mean, math.log(0.05))
    z = mean + logvar.mul(0.5).exp() * torch.randn(mean.shape, generator=g, dtype=torch.float64)
    parts = minibatch_decomposition(z, mean, logvar)
    log_q = -0.5 * ((z - mean) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi)).sum(1)
    log_p = -0.5 * (z**2 + math.log(2 * math.pi)).sum(1)
    assert float(parts["mi"] + parts["tc"] + parts["dwkl"]) == pytest.approx(float((log_q - log_p).mean()), abs=1e-6)
    assert float(parts["dwkl_per_dim"].sum()) == pytest.approx(float(parts["dwkl"]), abs=1e-6)
    correlated = mean.clone()
    correlated[:, 1] = 0.95 * mean[:, 0] + math.sqrt(1 - 0.95**2) * mean[:, 1]
    zc = correlated + logvar.mul(0.5).exp() * torch.randn(mean.shape, generator=g, dtype=torch.float64)
    assert float(minibatch_decomposition(zc, correlated, logvar)["tc"]) > float(parts["tc"]) + 0.5


def _square(n, generator, rotate):
    u = (torch.rand(n, 2, generator=generator) * 2 - 1) * math.sqrt(3)  # unit-variance uniform square
    if rotate:
        c = math.sqrt(0.5)
        u = u @ torch.tensor([[c, -c], [c, c]])
    return u


def test_discriminator_tc_tells_a_rotated_square_from_an_aligned_one():
    """True TC: 0 for the aligned square, 2 (H(triangular) - H(uniform)) = 0.31 nats for the 45° one."""
    estimates = {}
    for rotate in (False, True):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        disc = TCDiscriminator(latent_dim=2, hidden_dim=64, num_layers=2)
        opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
        for _ in range(300):
            loss = discriminator_loss(disc, _square(512, g, rotate), g)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            estimates[rotate] = float(disc.tc(_square(8192, g, rotate)))
    assert abs(estimates[False]) < 0.05
    assert estimates[True] > 0.12 and estimates[True] - estimates[False] > 0.12


def test_minibatch_tc_tells_the_frames_apart_only_with_narrow_posteriors():
    """At posterior std 0.05 and batch 1024 the minibatch estimate separates the frames; at std 0.7
    (about 0.4 nats per dimension) the posterior noise hides the difference: the reason the
    discriminator on the posterior means exists."""
    gaps = {}
    for std in (0.05, 0.7):
        g = torch.Generator().manual_seed(0)
        tc = {}
        for rotate in (False, True):
            mean = _square(1024, g, rotate).double()
            logvar = torch.full_like(mean, 2 * math.log(std))
            z = mean + std * torch.randn(mean.shape, generator=g, dtype=torch.float64)
            tc[rotate] = float(minibatch_decomposition(z, mean, logvar)["tc"])
        gaps[std] = tc[True] - tc[False]
    assert gaps[0.05] > 0.1
    assert abs(gaps[0.7]) < 0.08


def test_permute_dims_keeps_each_marginal():
    z = torch.arange(20.0).view(10, 2)
    p = permute_dims(z, torch.Generator().manual_seed(0))
    assert torch.equal(p[:, 0].sort().values, z[:, 0]) and torch.equal(p[:, 1].sort().values, z[:, 1])
    assert not torch.equal(p, z)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"capacity_on": "rate"}, "capacity_on must be 'information' or 'kl', got 'rate'."),
        ({"tc_estimator": "mws"}, "tc_estimator must be 'discriminator' or 'minibatch', got 'mws'."),
        ({"tc_on": "mean", "tc_estimator": "minibatch"}, "tc_on='mean' needs tc_estimator='discriminator'"),
        ({"tc_weight": -1.0}, "tc_weight must be a finite number >= 0, got -1.0."),
        ({"mismatch_weight": float("nan")}, "mismatch_weight must be a finite number >= 0, got nan."),
        ({"capacity": -2.0}, "capacity must be a finite number of nats >= 0, got -2.0."),
    ],
)
def test_rate_control_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        RateControl(**kwargs)


def test_rate_terms_need_the_discriminator_they_name():
    mean = torch.randn(8, 2)
    with pytest.raises(ValueError, match="needs a TCDiscriminator"):
        rate_terms(RateControl(tc_weight=1.0), mean, torch.zeros(8, 2), mean, torch.tensor(1.0))


# ---------------------------------------------------------------- noise bands and per-dimension fields


def _random_head(encoder):
    with torch.no_grad():
        encoder.head.weight.normal_(0, 0.3)
    return encoder


def test_nested_bands_and_their_mask():
    assert nested_guidance_bands(4, 1000) == (1000.0, 750.0, 500.0, 250.0)
    enc = tiny_encoder(latent_dim=4, guidance_bands=nested_guidance_bands(4))
    w = enc.guidance_weights(torch.tensor([0, 249, 250, 999]), 4)
    assert w.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]]
    assert tiny_encoder(latent_dim=4).guidance_weights(3, 2) is None
    with pytest.raises(ValueError, match="guidance_bands needs one positive upper timestep per latent dimension"):
        tiny_encoder(latent_dim=4, guidance_bands=(1000.0, 500.0))


def test_guidance_fields_add_up_and_bands_switch_dimensions_off(tmp_path):
    torch.manual_seed(0)
    enc = _random_head(tiny_encoder(latent_dim=3))
    x, z, t = torch.randn(2, 1, 8, 8), torch.randn(2, 3), torch.tensor([600, 600])
    full = posterior_score(enc, z, x, t)
    fields = [posterior_score(enc, z, x, t, dim_weights=torch.eye(3)[i].expand(2, 3)) for i in range(3)]
    torch.testing.assert_close(sum(fields), full, atol=1e-5, rtol=1e-5)
    banded = SAMIEncoder.from_config(enc.config, guidance_bands=(1000.0, 500.0, 500.0))
    banded.load_state_dict(enc.state_dict())
    torch.testing.assert_close(posterior_score(banded, z, x, t), fields[0], atol=1e-6, rtol=1e-6)  # only dim 0 at t = 600
    torch.testing.assert_close(posterior_score(banded, z, x, torch.tensor([100, 100])), posterior_score(enc, z, x, torch.tensor([100, 100])))
    banded.save_pretrained(tmp_path / "enc")
    reloaded = SAMIEncoder.from_pretrained(tmp_path / "enc")
    assert reloaded.config.guidance_bands == [1000.0, 500.0, 500.0]
    torch.testing.assert_close(posterior_score(reloaded, z, x, t), fields[0], atol=1e-6, rtol=1e-6)


def test_intervention_loss_is_a_share_and_trains_the_encoder():
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    unet, enc = tiny_unet(), _random_head(tiny_encoder(latent_dim=3))
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([10, 100, 200, 300, 400, 900])
    out = sami_loss(unet, enc, scheduler, x0, beta=0.01, generator=g, timesteps=t, intervention_weight=1.0,
                    intervention_dims=torch.tensor([0, 1, 2, 0, 1, 2]))
    assert 0.0 < float(out.intervention_loss) < 1.0
    out.loss.backward()
    assert enc.head.weight.grad is not None and float(enc.head.weight.grad.abs().sum()) > 0
    # With a zero-initialised head there is no field to move along, so nothing to penalise.
    fresh = tiny_encoder(latent_dim=3)
    out0 = sami_loss(unet, fresh, scheduler, x0, generator=torch.Generator().manual_seed(0), timesteps=t, intervention_weight=1.0)
    assert float(out0.intervention_loss) == 0.0


def test_intervention_loss_gradient_vanishes_with_the_field():
    """While the code is forming the guidance is near 0; the intervention loss must not dominate the
    diffusion loss then. A pure share (off / total) is scale-free, so its gradient grows like 1 / scale."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    unet, scheduler = tiny_unet(), DDPMScheduler(num_train_timesteps=1000)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    t = torch.tensor([10, 100, 200, 300, 400, 450])
    grads = []
    for scale in (1e-1, 1e-2, 1e-3):
        enc = _random_head(tiny_encoder(latent_dim=3))
        with torch.no_grad():
            enc.head.weight[:3].mul_(scale)  # the mean rows: fields shrink with scale
        out = sami_loss(unet, enc, scheduler, x0, beta=0.0, generator=torch.Generator().manual_seed(0), timesteps=t,
                        intervention_weight=1.0, intervention_dims=torch.tensor([0, 1, 2, 0, 1, 2]))
        (grad,) = torch.autograd.grad(out.loss - out.diffusion_loss, enc.head.weight)  # beta = 0: the intervention term alone
        grads.append(float(grad[:3].norm()))
    assert grads[2] < grads[1] < grads[0], grads


def test_sami_loss_reports_rate_terms_and_adds_them():
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    unet, enc = tiny_unet(), _random_head(tiny_encoder(latent_dim=3))
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    kwargs = dict(beta=0.0, timesteps=torch.arange(8) * 100, noise=torch.randn(8, 1, 8, 8), latent_noise=torch.randn(8, 3))
    plain = sami_loss(unet, enc, scheduler, x0, **kwargs)
    control = RateControl(capacity=2.0, mismatch_weight=0.5)
    priced = sami_loss(unet, enc, scheduler, x0, rate=control, **kwargs)
    expected = 0.5 * priced.rate["mismatch"] + (priced.rate["information_upper"] - 2.0).abs()
    torch.testing.assert_close(priced.loss, plain.loss + expected, atol=1e-5, rtol=1e-5)
    assert priced.rate["mismatch_per_dim"].shape == (3,)
    ramped = sami_loss(unet, enc, scheduler, x0, rate=RateControl(capacity=2.0, capacity_ramp_steps=4), step=0, **kwargs)
    assert float(ramped.rate["capacity"]) == 0.5


def test_capacity_schedule_starts_where_asked_and_reaches_the_target():
    """``at(step) = C (c0 + (1 - c0) min(1, (step + 1) / ramp))``, per dimension when C is a sequence."""
    assert [RateControl(capacity=4.0, capacity_ramp_steps=4).at(s) for s in (0, 1, 3, 9)] == [1.0, 2.0, 4.0, 4.0]
    assert [RateControl(capacity=4.0, capacity_ramp_steps=4, capacity_start=0.5).at(s) for s in (0, 3)] == [2.5, 4.0]
    assert RateControl(capacity=[2, 1], capacity_ramp_steps=2).at(0) == (1.0, 0.5)
    assert RateControl().at(5) is None
    with pytest.raises(ValueError, match=r"capacity_start must be a fraction of the target in \[0, 1\], got 2"):
        RateControl(capacity=1.0, capacity_start=2)


def test_per_dimension_capacities_price_each_dimension_against_its_own_target():
    """On the KL: ``sum_d |KL_d - C_d|`` with the closed-form Gaussian KL per dimension; on the
    information: each KL_d minus that dimension's moment-matched marginal mismatch."""
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g) * 0.3 - 1
    kl_d = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).mean(0)
    targets = (2.0, 0.5, 0.1)
    on_kl = rate_terms(RateControl(capacity=targets, capacity_on="kl"), mean, logvar, mean, kl_d.sum())
    torch.testing.assert_close(on_kl["loss"], (kl_d - torch.tensor(targets)).abs().sum())
    info_d = kl_d - moment_matched_kl(mean, logvar, per_dim=True)
    on_info = rate_terms(RateControl(capacity=targets), mean, logvar, mean, kl_d.sum())
    torch.testing.assert_close(on_info["loss"], (info_d - torch.tensor(targets)).abs().sum())
    assert float(on_info["capacity"]) == pytest.approx(2.6)
    with pytest.raises(ValueError, match="2 per-dimension capacities for a 3-dimensional code"):
        rate_terms(RateControl(capacity=(1.0, 1.0)), mean, logvar, mean, kl_d.sum())


def test_discriminator_step_clears_the_models_gradients_and_steps_once():
    """The model's TC term leaves gradients in the discriminator; one step uses only its own loss."""
    torch.manual_seed(0)
    disc = TCDiscriminator(latent_dim=2, hidden_dim=8, num_layers=1)
    opt = torch.optim.SGD(disc.parameters(), lr=0.1)
    codes, g = torch.randn(16, 2), torch.Generator().manual_seed(1)
    expected = TCDiscriminator(latent_dim=2, hidden_dim=8, num_layers=1)
    expected.load_state_dict(disc.state_dict())
    discriminator_loss(expected, codes, torch.Generator().manual_seed(1)).backward()
    disc.tc(codes * 3).backward()  # stale gradients from the model's own loss
    loss = discriminator_step(disc, opt, codes, g)
    for p, q in zip(disc.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q - 0.1 * q.grad)
        assert p.grad is None
    assert loss.requires_grad is False
