"""Rate control: what the KL term of a Gaussian-encoder VAE pays for, and knobs that price each part.

Averaged over the data, the KL of the code splits into the information the code carries and the
mismatch between the aggregate posterior ``q(z) = E_x q(z | x)`` and the prior (Hoffman & Johnson 2016):

    E_x KL(q(z | x) || p(z)) = I(x; z) + KL(q(z) || p(z)),                                      (1)

and the mismatch splits further into total correlation and dimension-wise KL (Chen et al. 2018):

    KL(q(z) || p(z)) = TC(z) + sum_d KL(q(z_d) || p(z_d)),  TC(z) = KL(q(z) || prod_d q(z_d)).    (2)

A budget on the left side of (1) can be met by the second term alone: a posterior that differs from
the prior but not between inputs carries no information. The terms here price each part:

* :func:`moment_matched_kl`: ``KL(N(m, S) || N(0, I))`` of the batch's moment-matched aggregate
  ``m = E[mu]``, ``S = Cov(mu) + E[diag sigma^2]``. A Gaussian has the largest entropy at a given
  covariance, so this is a lower bound on ``KL(q(z) || p(z))``; penalising it drives the aggregate's
  mean, scale and linear correlations to the prior's.
* :func:`information_upper_bound`: (1) with that lower bound, ``E KL - KL(N(m, S) || N(0, I)) >= I(x; z)``.
  It is exactly 0 for an input-independent posterior, so a capacity target on it cannot be met
  without information.
* :func:`mixture_information`: the N-sample mixture (InfoNCE) lower bound on ``I(x; z)``, at most
  ``log N``. Together with the upper bound it brackets the rate of any Gaussian encoder, which is how
  every method is put on one rate axis.
* :func:`minibatch_decomposition`: the three terms of (1)-(2) by minibatch-weighted sampling
  (Chen et al. 2018, with the minibatch as the data set), the β-TCVAE split.
* :class:`TCDiscriminator`: a density-ratio estimate of TC (Kim & Mnih 2018): a classifier between
  codes and codes whose dimensions were shuffled independently across the batch; its logit estimates
  ``log q(z) - log prod_d q(z_d)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .encoder import LatentPosterior
from .guidance import LOG_2PI, diagonal_gaussian_log_density

def _aggregate_moments(mean: torch.Tensor, logvar: torch.Tensor):
    """Mean (D,) and covariance (D, D) of the mixture ``1/B sum_b N(mu_b, diag sigma_b^2)``."""
    m = mean.mean(0)
    centred = mean - m
    cov = centred.T @ centred / mean.shape[0] + torch.diag(logvar.exp().mean(0))
    return m, cov


def moment_matched_kl(mean: torch.Tensor, logvar: torch.Tensor, per_dim: bool = False) -> torch.Tensor:
    """``KL(N(m, S) || N(0, I))`` of the batch's moment-matched aggregate posterior, in nats (eq. (1)).

    ``= 1/2 [tr S + m^T m - D - log det S]``. With ``per_dim=True``, the (D,) marginal terms
    ``1/2 [S_dd + m_d^2 - 1 - log S_dd]`` (a lower bound on each ``KL(q(z_d) || p(z_d))``); their sum
    leaves out the correlations, which the full form includes.
    """
    dtype = torch.promote_types(mean.dtype, torch.float32)
    m, cov = _aggregate_moments(mean.to(dtype), logvar.to(dtype))
    if per_dim:
        var = torch.diagonal(cov)
        return 0.5 * (var + m**2 - 1.0 - torch.log(var))
    d = m.shape[0]
    return 0.5 * (torch.trace(cov) + m @ m - d - torch.logdet(cov))


def information_upper_bound(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``E_x KL(q(z|x) || N(0, I)) - KL(N(m, S) || N(0, I)) >= I(x; z)`` over the batch, in nats (eq. (1)).

    The bound is tight when the aggregate posterior is Gaussian; it is 0 when every input gets the
    same posterior.
    """
    dtype = torch.promote_types(mean.dtype, torch.float32)
    mean, logvar = mean.to(dtype), logvar.to(dtype)
    kl = LatentPosterior(torch.cat([mean, logvar], dim=-1)).kl().mean()
    return kl - moment_matched_kl(mean, logvar)


def _log_density_matrix(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """(B, B, D): ``log N(z_i,d; mu_j,d, sigma_j,d^2)`` for every pair of codes i and posteriors j."""
    dtype = torch.promote_types(mean.dtype, torch.float32)
    z, mean, logvar = z.to(dtype)[:, None, :], mean.to(dtype)[None], logvar.to(dtype)[None]
    return diagonal_gaussian_log_density(z, mean, logvar)


def mixture_information(mean: torch.Tensor, logvar: torch.Tensor, generator: Optional[torch.Generator] = None,
                        num_draws: int = 1, block: int = 1024) -> float:
    """Lower bound on ``I(x; z)`` in nats from N posteriors: ``E_i[log q(z_i|x_i) - log 1/N sum_j q(z_i|x_j)]``.

    ``z_i ~ q(z | x_i)``. This is the InfoNCE bound with the N inputs as each other's negatives; it
    is at most ``log N`` (so use N well above ``exp`` of the rate you want to see).

    Args:
        mean, logvar: (N, D) posterior parameters of N independent inputs.
        generator: draws of ``z``.
        num_draws: codes drawn per input (averaged).
        block: rows per step of the N x N computation (memory).
    """
    mean, logvar = mean.double(), logvar.double()
    n = mean.shape[0]
    std = torch.exp(0.5 * logvar)
    total = 0.0
    for _ in range(num_draws):
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device="cpu").to(mean.device)
        z = mean + std * eps
        for start in range(0, n, block):
            zi = z[start:start + block]
            log_all = _log_density_matrix(zi, mean, logvar).sum(-1)
            own = log_all[torch.arange(zi.shape[0]), torch.arange(start, start + zi.shape[0])]
            total += float((own - (torch.logsumexp(log_all, dim=1) - math.log(n))).sum())
    return total / (n * num_draws)


def minibatch_decomposition(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Index-code MI, TC and dimension-wise KL of eq. (1)-(2) by minibatch-weighted sampling.

    With the batch of B inputs standing in for the data, ``log q(z_i) ~ logsumexp_j log q(z_i|x_j) - log B``
    and ``log q(z_i,d) ~ logsumexp_j log q(z_i,d|x_j) - log B`` (Chen et al. 2018, eq. (S5) with N = B):

        mi = E[log q(z|x) - log q(z)],  tc = E[log q(z) - sum_d log q(z_d)],
        dwkl = E[sum_d log q(z_d) - log p(z)],  mi + tc + dwkl = E[log q(z|x) - log p(z)].

    Returns (scalars, differentiable): ``mi``, ``tc``, ``dwkl`` and ``dwkl_per_dim`` (D,).
    """
    b = z.shape[0]
    log_pair = _log_density_matrix(z, mean, logvar)  # (B, B, D)
    log_qz_given_x = torch.diagonal(log_pair.sum(-1))
    log_qz = torch.logsumexp(log_pair.sum(-1), dim=1) - math.log(b)
    log_qzd = torch.logsumexp(log_pair, dim=1) - math.log(b)  # (B, D)
    log_pz_d = -0.5 * (z.to(log_pair.dtype) ** 2 + LOG_2PI)
    return {
        "mi": (log_qz_given_x - log_qz).mean(),
        "tc": (log_qz - log_qzd.sum(1)).mean(),
        "dwkl": (log_qzd - log_pz_d).sum(1).mean(),
        "dwkl_per_dim": (log_qzd - log_pz_d).mean(0),
    }


def permute_dims(z: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Shuffle each column of (B, D) codes independently across the batch: draws from ``prod_d q(z_d)``."""
    b, d = z.shape
    order = torch.argsort(torch.rand(b, d, generator=generator).to(z.device), dim=0)
    return torch.gather(z, 0, order)


class TCDiscriminator(ModelMixin, ConfigMixin):
    """Classifier between codes ``z ~ q(z)`` and dimension-shuffled codes ``z ~ prod_d q(z_d)``.

    Trained with :func:`discriminator_loss`, its logit ``log D / (1 - D)`` estimates the density ratio
    ``log q(z) - log prod_d q(z_d)``, so its mean over codes estimates TC (eq. (2)) whatever the width
    of the posteriors (Kim & Mnih 2018). An MLP with LeakyReLU, as FactorVAE's, narrower.

    Args:
        latent_dim: size of the code.
        hidden_dim: width of the hidden layers.
        num_layers: hidden layers.
    """

    @register_to_config
    def __init__(self, latent_dim: int = 8, hidden_dim: int = 256, num_layers: int = 3):
        super().__init__()
        layers, width = [], latent_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.LeakyReLU(0.2)]
            width = hidden_dim
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D) codes -> (B,) logits, the estimated ``log q(z) - log prod_d q(z_d)``."""
        return self.net(z.float()).squeeze(-1)

    def tc(self, z: torch.Tensor) -> torch.Tensor:
        """Estimated total correlation of the codes' distribution, in nats (mean logit)."""
        return self(z).mean()

    def make_optimizer(self) -> torch.optim.Optimizer:
        """FactorVAE's Adam (lr 1e-4, betas (0.5, 0.9)): the one optimiser of every model's discriminator."""
        return torch.optim.Adam(self.parameters(), lr=1e-4, betas=(0.5, 0.9))


def discriminator_loss(discriminator, z: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Logistic loss of a :class:`TCDiscriminator` (or its DDP wrapper): ``z`` (detached) labelled 1,
    its dimension-shuffled copy labelled 0, in one forward pass."""
    z = z.detach()
    logits = discriminator(torch.cat([z, permute_dims(z, generator)]))
    labels = torch.cat([torch.ones(z.shape[0]), torch.zeros(z.shape[0])]).to(logits)
    return 2 * F.binary_cross_entropy_with_logits(logits, labels)


@dataclass
class RateControl:
    """Rate terms added to ``beta * KL`` in :func:`sami_adapter.objective.sami_loss` and the baselines.

    Every weight is in nats of loss per nat of the term, and each adds to ``beta`` on its part of
    eq. (1)-(2) (``tc_weight = 5`` with ``beta = 1`` weighs TC six times, as a β-TCVAE with β = 6).
    The aggregate-posterior terms are statistics of the batch a call sees: under several processes
    or gradient accumulation each part's batch is its own aggregate, so keep that batch large enough
    (64 and up) for the moments to mean something.

    Args:
        capacity: target ``C`` in nats for the quantity named by ``capacity_on``; the loss adds
            ``capacity_weight * |value - C|`` (Burgess et al. 2018). A sequence of D targets puts one
            on each dimension instead (``capacity_weight * sum_d |value_d - C_d|``, with the per-dimension
            value: the KL of dimension d, or for ``"information"`` that KL minus the dimension's
            moment-matched marginal mismatch). Unequal targets make the rates, and with them the
            posterior widths, differ between dimensions, which a rotation of the code then changes
            (equal rates leave the KL and the guidance rotation-neutral). None: no target.
        capacity_on: ``"information"`` (:func:`information_upper_bound`; cannot be met by mismatch)
            or ``"kl"`` (the batch-mean KL, as Burgess et al.).
        capacity_ramp_steps: move the target linearly from ``capacity_start * C`` to ``C`` over this
            many steps (0: ``C`` from the first step); :meth:`at` gives the target at a step.
        capacity_start: the ramp's first value as a fraction of ``C``. Above 0, a priced run never
            sits at the collapsed point ``C = 0`` it would have to escape.
        capacity_weight: weight of the capacity term.
        mismatch_weight: weight of :func:`moment_matched_kl` (aggregate posterior vs prior).
        tc_weight: weight of the TC estimate.
        tc_estimator: ``"discriminator"`` (:class:`TCDiscriminator`, needs one passed to the loss) or
            ``"minibatch"`` (:func:`minibatch_decomposition`).
        tc_on: ``"sample"`` (TC of ``z ~ q(z|x)``) or ``"mean"`` (TC of the posterior means, the code
            the metrics read; only for the discriminator).
    """

    capacity: Optional[Union[float, Sequence[float]]] = None
    capacity_on: str = "information"
    capacity_weight: float = 1.0
    capacity_ramp_steps: int = 0
    capacity_start: float = 0.0
    mismatch_weight: float = 0.0
    tc_weight: float = 0.0
    tc_estimator: str = "discriminator"
    tc_on: str = "sample"

    def __post_init__(self):
        if self.capacity_on not in ("information", "kl"):
            raise ValueError(f"capacity_on must be 'information' or 'kl', got {self.capacity_on!r}.")
        if self.tc_estimator not in ("discriminator", "minibatch"):
            raise ValueError(f"tc_estimator must be 'discriminator' or 'minibatch', got {self.tc_estimator!r}.")
        if self.tc_on not in ("sample", "mean"):
            raise ValueError(f"tc_on must be 'sample' or 'mean', got {self.tc_on!r}.")
        if self.tc_on == "mean" and self.tc_estimator != "discriminator":
            raise ValueError("tc_on='mean' needs tc_estimator='discriminator' (the minibatch estimator needs posterior widths).")
        for name in ("capacity_weight", "mismatch_weight", "tc_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
        if self.capacity is not None:
            values = [self.capacity] if isinstance(self.capacity, (int, float)) else list(self.capacity)
            if not values or any(not math.isfinite(v) or v < 0 for v in values):
                raise ValueError(f"capacity must be a finite number of nats >= 0, got {self.capacity}.")
            if not isinstance(self.capacity, (int, float)):
                self.capacity = tuple(float(v) for v in values)
        if self.capacity_ramp_steps < 0:
            raise ValueError(f"capacity_ramp_steps must be an integer >= 0, got {self.capacity_ramp_steps}.")
        if not 0 <= self.capacity_start <= 1:
            raise ValueError(f"capacity_start must be a fraction of the target in [0, 1], got {self.capacity_start}.")

    def at(self, step: int) -> Optional[Union[float, tuple]]:
        """The capacity target at optimiser step ``step`` (0-based): ``C * (c0 + (1 - c0) * min(1, (step + 1) / ramp))``
        with ``c0 = capacity_start``; per dimension when ``capacity`` is a sequence. None without a target."""
        if self.capacity is None:
            return None
        fraction = 1.0
        if self.capacity_ramp_steps:
            fraction = self.capacity_start + (1.0 - self.capacity_start) * min(1.0, (step + 1) / self.capacity_ramp_steps)
        if isinstance(self.capacity, tuple):
            return tuple(c * fraction for c in self.capacity)
        return self.capacity * fraction

    @property
    def needs_discriminator(self) -> bool:
        """True when the loss needs a :class:`TCDiscriminator`."""
        return self.tc_weight > 0 and self.tc_estimator == "discriminator"

    @property
    def uses_decomposition(self) -> bool:
        return self.tc_weight > 0 and self.tc_estimator == "minibatch"


def rate_terms(control: RateControl, mean: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor, kl: torch.Tensor,
               step: int = 0, discriminator: Optional[TCDiscriminator] = None) -> Dict[str, torch.Tensor]:
    """The loss terms of ``control`` on one batch, plus what they measure.

    Args:
        control: the weights.
        mean, logvar, z: (B, D) posterior parameters of the batch and the codes drawn from them.
        kl: the batch-mean ``KL(q(z|x) || N(0, I))`` (scalar).
        step: the optimiser step, for the capacity schedule (:meth:`RateControl.at`).
        discriminator: the :class:`TCDiscriminator`, when ``control.needs_discriminator``.

    Returns:
        ``loss`` (the weighted sum to add) and detached measurements: ``information_upper``,
        ``mismatch``, ``mismatch_per_dim`` and, when computed, ``tc``, ``mi``, ``dwkl``, ``capacity``.
    """
    out: Dict[str, torch.Tensor] = {}
    loss = kl.new_zeros(())
    mismatch = moment_matched_kl(mean, logvar)
    information = kl - mismatch
    out["information_upper"], out["mismatch"] = information.detach(), mismatch.detach()
    out["mismatch_per_dim"] = moment_matched_kl(mean.detach(), logvar.detach(), per_dim=True)
    if control.mismatch_weight > 0:
        loss = loss + control.mismatch_weight * mismatch
    target = control.at(step)
    if isinstance(target, tuple):
        if len(target) != mean.shape[1]:
            raise ValueError(f"RateControl has {len(target)} per-dimension capacities for a {mean.shape[1]}-dimensional code; give one per dimension.")
        value = LatentPosterior(torch.cat([mean, logvar], dim=-1)).kl_per_dim().mean(0)
        if control.capacity_on == "information":
            value = value - moment_matched_kl(mean, logvar, per_dim=True)
        loss = loss + control.capacity_weight * (value - value.new_tensor(target)).abs().sum()
        out["capacity"] = torch.tensor(float(sum(target)))
    elif target is not None:
        value = information if control.capacity_on == "information" else kl
        loss = loss + control.capacity_weight * (value - target).abs()
        out["capacity"] = torch.tensor(float(target))
    if control.uses_decomposition:
        parts = minibatch_decomposition(z, mean, logvar)
        loss = loss + control.tc_weight * parts["tc"]
        out.update({k: v.detach() for k, v in parts.items()})
    if control.needs_discriminator:
        if discriminator is None:
            raise ValueError("RateControl(tc_estimator='discriminator', tc_weight > 0) needs a TCDiscriminator; pass discriminator=.")
        tc = discriminator.tc(mean if control.tc_on == "mean" else z)
        loss = loss + control.tc_weight * tc
        out["tc"] = tc.detach()
    out["loss"] = loss
    return out


def discriminator_step(discriminator, optimizer, codes: torch.Tensor, generator: Optional[torch.Generator] = None,
                       backward: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """One optimiser step of a :class:`TCDiscriminator` on this step's (detached) codes; returns its loss.

    SAMI and the baselines call it in one order: after the model's own step, so the model's TC term
    was computed with the discriminator its loss saw. The model's backward pass also left gradients
    in the discriminator (its TC term); they are cleared first. ``backward``: ``accelerator.backward``
    under Accelerate (default ``loss.backward()``).
    """
    optimizer.zero_grad(set_to_none=True)
    loss = discriminator_loss(discriminator, codes, generator)
    (backward or torch.Tensor.backward)(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
