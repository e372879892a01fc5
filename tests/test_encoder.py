"""The paper's encoder: noise-blind and bias-free (no additive constant before the head)."""

from __future__ import annotations

import pytest
import torch

from sami_adapter import SAMIEncoder
from sami_adapter.encoder import BiasFreeGroupNorm


def _randomised(encoder: SAMIEncoder) -> SAMIEncoder:
    """Every weight random (norm scales away from 1 too), so no zero-initialised layer hides an offset."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.ndim == 1 else 0.0))
    return encoder


def test_bias_free_encoder_has_no_additive_constant():
    encoder = _randomised(SAMIEncoder(sample_size=16, latent_dim=4, time_conditioning=False, bias_free=True))
    assert [n for n, _ in encoder.named_parameters() if "bias" in n] == ["head.bias"]
    zero = torch.zeros(3, 1, 16, 16)
    assert torch.equal(encoder.features(zero), torch.zeros(3, encoder.config.hidden_dim))  # exactly zero, before the head
    assert encoder.features(torch.randn(3, 1, 16, 16)).abs().max() > 0.1
    # The usual encoder has offsets: a zero image gives non-zero features.
    usual = _randomised(SAMIEncoder(sample_size=16, latent_dim=4, time_conditioning=False))
    assert usual.features(zero).abs().max() > 0.1


def test_bias_free_norm_is_scale_equivariant_and_keeps_zero():
    norm = BiasFreeGroupNorm(2, 4)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(norm(3.0 * x), norm(x), atol=1e-5, rtol=1e-5)  # no mean, so only the scale is removed
    torch.testing.assert_close(norm(-x), -norm(x))  # odd: a mean subtraction or offset would break this
    assert torch.equal(norm(torch.zeros(1, 4, 2, 2)), torch.zeros(1, 4, 2, 2))


def test_bias_free_encoder_has_a_middle_block_and_round_trips(tmp_path):
    encoder = _randomised(SAMIEncoder(sample_size=16, latent_dim=4, time_conditioning=False, bias_free=True))
    usual = SAMIEncoder(sample_size=16, latent_dim=4, time_conditioning=False)
    assert len(encoder.blocks) == len(usual.blocks) + 1
    encoder.save_pretrained(tmp_path)
    loaded = SAMIEncoder.from_pretrained(tmp_path)
    assert loaded.config.bias_free and not loaded.config.time_conditioning
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(loaded(x).mean, encoder(x).mean)


def test_bias_free_needs_a_noise_blind_encoder():
    with pytest.raises(ValueError, match=r"bias_free=True needs time_conditioning=False: a timestep embedding adds a constant"):
        SAMIEncoder(bias_free=True)
