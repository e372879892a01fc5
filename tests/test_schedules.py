"""Training schedules (beta, latent-noise warm-up) and encoder-shape options."""

import math

import pytest
import torch

from sami_adapter import SAMIEncoder
from sami_adapter.training import beta_at


def test_beta_constant_and_linear_warmup():
    assert beta_at(0, 100, 0.01) == 0.01
    assert beta_at(99, 100, 0.01) == 0.01
    # linear ramp from 0 over the warm-up, reaching beta at its last step
    assert beta_at(0, 100, 0.01, warmup_steps=10) == pytest.approx(0.001)
    assert beta_at(4, 100, 0.01, warmup_steps=10) == pytest.approx(0.005)
    assert beta_at(9, 100, 0.01, warmup_steps=10) == pytest.approx(0.01)


def test_beta_geometric_schedule_hits_both_ends_and_the_geometric_midpoint():
    assert beta_at(0, 101, 0.01, 1.0) == pytest.approx(0.01)
    assert beta_at(100, 101, 0.01, 1.0) == pytest.approx(1.0)
    assert beta_at(50, 101, 0.01, 1.0) == pytest.approx(math.sqrt(0.01 * 1.0))
    # after a warm-up the schedule starts from beta at the warm-up's last step
    assert beta_at(9, 110, 0.01, 1.0, warmup_steps=10) == pytest.approx(0.01)
    assert beta_at(109, 110, 0.01, 1.0, warmup_steps=10) == pytest.approx(1.0)
    # monotone in between
    values = [beta_at(s, 110, 0.01, 1.0, warmup_steps=10) for s in range(9, 110)]
    assert all(b > a for a, b in zip(values, values[1:]))
    # a zero end is linear, not geometric
    assert beta_at(50, 101, 0.0, 1.0) == pytest.approx(0.5)


def test_beta_rejects_negative():
    with pytest.raises(ValueError, match="beta must be >= 0"):
        beta_at(0, 10, -0.1)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        beta_at(0, 10, 0.1, -1.0)


@pytest.mark.parametrize("stem_stride", [1, 2])
def test_encoder_stem_stride_keeps_every_pixel_in_view(stem_stride):
    torch.manual_seed(0)
    enc = SAMIEncoder(in_channels=1, sample_size=8, latent_dim=3, block_out_channels=(8, 16), hidden_dim=16,
                      norm_num_groups=4, stem_stride=stem_stride)
    with torch.no_grad():
        enc.head.weight.normal_(0, 0.1)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    post = enc(x, torch.tensor([0, 500]))
    assert post.mean.shape == (2, 3)
    post.mean.sum().backward()
    # a stride-2 3x3 stem still sees every input pixel: the gradient is non-zero everywhere
    assert (x.grad.abs() > 0).all()


def test_encoder_rejects_bad_stem_stride():
    with pytest.raises(ValueError, match="stem_stride must be 1 or 2"):
        SAMIEncoder(stem_stride=3)


def test_encoder_min_logvar_is_a_soft_floor_that_starts_at_init_logvar():
    """``min_logvar`` (finetune's ``--encoder_min_logvar``): ``logvar = min + softplus(raw - min)``, and the
    zero-initialised head starts every posterior exactly at ``init_logvar``."""
    enc = SAMIEncoder(in_channels=1, sample_size=8, latent_dim=3, block_out_channels=(8, 16), hidden_dim=16, norm_num_groups=4,
                      init_logvar=-1.0, min_logvar=-4.0)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(enc(x, 10).logvar, torch.full((4, 3), -1.0))
    with torch.no_grad():
        enc.head.bias[3:] = -50.0  # a raw log-variance far below the floor
    torch.testing.assert_close(enc(x, 10).logvar, torch.full((4, 3), -4.0))
    with torch.no_grad():
        enc.head.bias[3:] = 2.0
    torch.testing.assert_close(enc(x, 10).logvar, -4.0 + torch.nn.functional.softplus(torch.full((4, 3), 6.0)))
    with pytest.raises(ValueError, match="must be above min_logvar"):
        SAMIEncoder(init_logvar=-1.0, min_logvar=0.0)
