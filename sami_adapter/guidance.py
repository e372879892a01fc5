"""The SAMI math: noise levels, the posterior score, and its conversion into a guided model output.

Notation: the variance-preserving forward process is

    x_t = a_t x_0 + s_t eps,      a_t = sqrt(abar_t),   s_t = sqrt(1 - abar_t).            (1)

The SAMI decoder is the unconditional model guided by the inference network q(z | x_t, t). By
Bayes' rule (p(z | x_t) approximated by q),

    grad log p(x_t | z) = grad log p(x_t) + grad_{x_t} log q(z | x_t, t).                  (2)

Since ``eps_theta(x_t) = -s_t grad log p(x_t)``, the guided noise prediction is

    eps_hat = eps_theta(x_t, t) - s_t * g,        g = grad_{x_t} log q(z | x_t, t).       (3)

Every other parameterisation follows from (1) and (3):

    x0_hat = (x_t - s_t eps_hat) / a_t = x0_theta + (s_t^2 / a_t) g                      (4)
    v_hat  = a_t eps_hat - s_t x0_hat  = v_theta - (s_t / a_t) g   (using a^2 + s^2 = 1)   (5)

Sigma-parameterised schedulers (Euler, Heun, LMS, DPM-Solver, UniPC, ...) write the same process
as ``x_t / a_t = x_0 + sigma_t eps`` with ``sigma_t = s_t / a_t``, so ``abar_t = 1 / (1 + sigma_t^2)``;
their ``scale_model_input`` hands the UNet exactly the variance-preserving ``x_t`` of (1) (or
leaves it unchanged when the state already is ``x_t``), so g is taken with respect to the
UNet's input and (3)-(5) hold unchanged.

The SAMI encoder reads clean images at ``t = 0``: ``q(z | x_0)`` is the encoder at timestep 0,
so wherever an encoder input is built from a timestep, ``t = 0`` means ``a = 1, s = 0``
(:func:`encoder_noise_level`), not the scheduler's first noise level.

The formulas live here, each beside its equation; the rest of the package calls them.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Tuple, Union

import torch

TimestepLike = Union[int, float, torch.Tensor]
LOG_2PI = math.log(2 * math.pi)


def _timestep_tensor(timestep: TimestepLike, batch_size: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(timestep, device=device)
    if t.ndim == 0:
        t = t.expand(batch_size)
    if t.ndim != 1 or t.shape[0] != batch_size:
        raise ValueError(
            f"timestep must be a scalar or a 1-D tensor with one entry per sample ({batch_size}), got shape {tuple(t.shape)}."
        )
    return t


def check_timesteps(timestep: TimestepLike, num_train_timesteps: int) -> None:
    """Raise a ValueError for timesteps outside ``[0, num_train_timesteps)`` or non-finite ones."""
    t = torch.as_tensor(timestep, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError("timestep contains NaN or inf; pass finite timesteps in [0, num_train_timesteps).")
    if (t < 0).any() or (t > num_train_timesteps - 1).any():
        raise ValueError(
            f"timestep out of range: got min {t.min().item():g}, max {t.max().item():g}; "
            f"timesteps must lie in [0, {num_train_timesteps - 1}] (the scheduler's num_train_timesteps is {num_train_timesteps})."
        )


def alpha_sigma_from_alphas_cumprod(alphas_cumprod: torch.Tensor, timestep: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a_t, s_t)`` of equation (1) from ``alphas_cumprod`` at (possibly fractional) timesteps.

    Integer timesteps read ``abar_t = alphas_cumprod[t]`` directly. Fractional timesteps, as
    Euler-type schedulers pass them, interpolate ``sigma_t = s_t / a_t`` linearly between the
    neighbouring integer steps, the way diffusers builds their sigmas. A zero-terminal-SNR schedule
    (``abar_{T-1} = 0``) gives ``a_t = 0, s_t = 1`` there, not NaN.
    """
    alphas_cumprod = alphas_cumprod.to(device=timestep.device, dtype=torch.float64)
    t = timestep.to(torch.float64)
    lo = t.floor().long().clamp(0, alphas_cumprod.shape[0] - 1)
    hi = (lo + 1).clamp(max=alphas_cumprod.shape[0] - 1)
    frac = t - lo.to(torch.float64)
    sigma_ve = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()  # inf where abar = 0
    interpolated = 1.0 / (1.0 + (sigma_ve[lo] + (sigma_ve[hi] - sigma_ve[lo]).nan_to_num(posinf=float("inf")) * frac) ** 2)
    abar = torch.where(frac == 0, alphas_cumprod[lo], interpolated)
    return abar.sqrt(), (1 - abar).sqrt()


def encoder_noise_level(alphas_cumprod: torch.Tensor, timestep: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a_t, s_t)`` of the encoder's input at ``timestep``: as :func:`alpha_sigma_from_alphas_cumprod`,
    except that ``t = 0`` is the clean image itself (``a = 1, s = 0``), the level at which the encoder
    gives ``q(z | x_0)`` (module docstring)."""
    alpha, sigma = alpha_sigma_from_alphas_cumprod(alphas_cumprod, timestep)
    clean = timestep.to(alpha.device) == 0
    return torch.where(clean, torch.ones_like(alpha), alpha), torch.where(clean, torch.zeros_like(sigma), sigma)


def add_noise(clean: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Equation (1), ``x_t = a_t x_0 + s_t eps``, with per-sample ``alpha``, ``sigma`` of shape (B,)."""
    return _per_sample(alpha, clean) * clean + _per_sample(sigma, clean) * noise


def predicted_clean(sample: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Equation (1) solved for the clean image: ``x0_hat = (x_t - s_t eps) / a_t`` (per-sample ``alpha``, ``sigma``)."""
    return (sample - _per_sample(sigma, sample) * eps) / _per_sample(alpha, sample)


def check_scheduler(scheduler: Any) -> None:
    """Raise a TypeError unless the scheduler is variance-preserving (it has ``alphas_cumprod``).

    DDPM/DDIM/PNDM/LCM/TCD and the sigma family (Euler, Heun, LMS, KDPM2, DPM-Solver, UniPC, DEIS)
    all do; EDM, flow-matching and variance-exploding schedulers do not.
    """
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise TypeError(
            f"{type(scheduler).__name__} has no `alphas_cumprod`: it is not a variance-preserving scheduler, so SAMI "
            "guidance cannot find the noise level. Use a DDPM/DDIM/PNDM-type or an Euler/DPM-Solver/UniPC-type "
            "scheduler, e.g. `DDIMScheduler.from_config(pipe.scheduler.config)`."
        )


def check_first_step(scheduler: Any) -> None:
    """Raise a ValueError when sampling would start where an epsilon-prediction model has no answer.

    A scheduler with zero terminal SNR (``rescale_betas_zero_snr=True``) has ``alphas_cumprod = 0`` at
    its last training timestep; with ``timestep_spacing="trailing"`` sampling starts there. The image
    an epsilon model implies, ``(x_t - s_t eps) / a_t``, divides by ``a_t = 0``: every output is NaN.
    """
    if scheduler.config.get("prediction_type", "epsilon") != "epsilon" or len(getattr(scheduler, "timesteps", [])) == 0:
        return
    first = int(scheduler.timesteps[0])
    if float(scheduler.alphas_cumprod[first]) == 0.0:
        raise ValueError(
            f"{type(scheduler).__name__} starts at timestep {first}, where alphas_cumprod is 0 (zero terminal SNR, "
            "rescale_betas_zero_snr=True): an epsilon-prediction model cannot predict the image from pure noise there "
            "(it divides by a_t = 0), so every image would be NaN. Use a v-prediction model, a scheduler without zero "
            "terminal SNR (rescale_betas_zero_snr=False), or timestep_spacing='leading', which starts below the last timestep."
        )


def _model_input_sigma(scheduler: Any, index: int) -> torch.Tensor:
    """The sigma by which a sigma scheduler scaled this step's model input (``x / sqrt(1 + sigma^2)``).

    First-order steps use ``sigmas[index]``; the second stage of KDPM2, KDPM2-Ancestral and
    DPM-Solver-SDE uses an interpolated or mid-point sigma instead. Rather than copying each
    scheduler's bookkeeping, the scale its own ``scale_model_input`` applies is measured and matched
    exactly against the sigmas it keeps. A scheduler that leaves its input unscaled (DPM-Solver,
    UniPC, DEIS: the state already is ``x_t``) is at ``sigmas[index]``.

    Raises:
        TypeError: the scale matches none of the scheduler's sigmas (an unknown scheduler).
    """
    timestep = scheduler.timesteps[index]
    one = torch.ones(1, dtype=scheduler.sigmas.dtype, device=scheduler.sigmas.device)
    scale = scheduler.scale_model_input(one, timestep)
    sigma = scheduler.sigmas[index]
    if torch.equal(scale, one):
        return sigma
    candidates = [sigma]
    for name in ("sigmas_interpol", "mid_point_sigma"):
        value = getattr(scheduler, name, None)
        if isinstance(value, torch.Tensor) and value.ndim == 1:
            candidates += [value[i] for i in (index, index - 1) if 0 <= i < len(value)]
        elif value is not None:
            candidates.append(torch.as_tensor(value))
    for candidate in candidates:
        candidate = candidate.to(one)
        if torch.equal(one / ((candidate**2 + 1) ** 0.5), scale):
            return candidate
    raise TypeError(
        f"{type(scheduler).__name__} scales its model input by {scale.item():.6g}, which matches none of its sigmas at step "
        f"{index}: SAMI guidance cannot tell the noise level of this model call. Use DDIM, DDPM, Euler, Heun, LMS, KDPM2, "
        "DPM-Solver, UniPC or DEIS."
    )


def noise_level(scheduler: Any, timestep: TimestepLike, batch_size: int = 1, device: torch.device | str = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a_t, s_t)`` (each shape ``(batch_size,)``, float64) of the UNet input at ``timestep``.

    * In the middle of a sigma scheduler's loop (Euler, Heun, LMS, KDPM2, DPM-Solver, UniPC, ...),
      when ``timestep`` is the scheduler's current one: the sigma that scheduler used for this model
      call (``sigmas[step_index]``, or the interpolated / mid-point sigma of a second-order stage; see
      :func:`_model_input_sigma`), then ``abar_t = 1 / (1 + sigma^2)``. Multistep solvers set
      ``step_index`` only in ``step()``; before their first step the timestep is looked up in
      ``scheduler.timesteps``.
    * Otherwise, i.e. alphas_cumprod schedulers (DDPM, DDIM, PNDM, LCM, TCD), any other timestep,
      per-sample timesteps, or a finished loop: ``abar_t = alphas_cumprod[t]`` at the timestep given
      (interpolated for fractional ``t``), so the result always belongs to ``timestep``.

    Raises:
        TypeError: the scheduler has no ``alphas_cumprod`` (EDM, flow-matching or variance-exploding
            schedulers), or its model-input scale cannot be matched to a sigma.
        ValueError: the timestep is negative, non-finite or beyond ``num_train_timesteps``.
    """
    device = torch.device(device)
    check_scheduler(scheduler)
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    sigmas = getattr(scheduler, "sigmas", None)
    num_train = int(getattr(scheduler.config, "num_train_timesteps", len(alphas_cumprod)))
    check_timesteps(timestep, num_train)
    t = _timestep_tensor(timestep, batch_size, device)

    timesteps = getattr(scheduler, "timesteps", None)
    if isinstance(sigmas, torch.Tensor) and isinstance(timesteps, torch.Tensor) and bool((t == t[0]).all()):
        index = getattr(scheduler, "step_index", None)
        current = t[0].to(timesteps.dtype if timesteps.is_floating_point() else torch.float64)
        if index is not None:
            if not (index < len(timesteps) and float(timesteps[index]) == float(current)):
                index = None  # not this loop's current step: use the timestep given
            else:
                sigma = _model_input_sigma(scheduler, index)
                abar = (1.0 / (1.0 + sigma.to(device=device, dtype=torch.float64) ** 2)).expand(batch_size)
                return abar.sqrt(), (1 - abar).sqrt()
        elif not hasattr(scheduler, "state_in_first_order"):
            # A multistep solver before its first step(): its sigmas line up with its timesteps.
            matches = (timesteps.to(t.device).double() == t[0].double()).nonzero()
            if len(matches):
                sigma = sigmas[int(matches[0])].to(device=device, dtype=torch.float64).expand(batch_size)
                abar = 1.0 / (1.0 + sigma**2)
                return abar.sqrt(), (1 - abar).sqrt()
    return alpha_sigma_from_alphas_cumprod(alphas_cumprod, t)


def diagonal_gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, normalised: bool = True) -> torch.Tensor:
    """``log N(z_i; mu_i, sigma_i^2) = -1/2 [(z_i - mu_i)^2 / sigma_i^2 + log sigma_i^2 + log 2 pi]`` per dimension (broadcast).

    ``normalised=False`` leaves out ``log 2 pi``: a constant, so the score (2) does not need it.
    """
    quadratic = (z - mean) ** 2 * torch.exp(-logvar) + logvar
    return -0.5 * (quadratic + LOG_2PI if normalised else quadratic)


def posterior_score(
    encoder: Callable[[torch.Tensor, torch.Tensor], Any],
    z: torch.Tensor,
    sample: torch.Tensor,
    timestep: TimestepLike,
    create_graph: bool = False,
    dim_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``g = grad_{x_t} log q(z | x_t, t)`` for a diagonal-Gaussian ``q`` (equation (2)).

    ``log q(z | x_t) = -1/2 sum_i [ (z_i - mu_i(x_t))^2 / sigma_i^2(x_t) + log sigma_i^2(x_t) + log 2 pi ]``
    is differentiated by autograd with respect to ``sample``. Samples in the batch are
    independent (the encoder must not mix them, e.g. no BatchNorm), so the gradient of the
    summed log-density is each sample's own score.

    Args:
        encoder: any callable ``(sample, timestep) -> object with .mean and .logvar`` of shape (B, D).
        z: the code, shape (B, D). Keep its graph (``create_graph=True``) to train through it.
        sample: the UNet input ``x_t``, shape (B, C, H, W).
        timestep: scalar or (B,) timesteps.
        create_graph: build the graph of the score itself, for the training loss (double backward).
        dim_weights: optional (B, D) or (D,) weights ``w_i`` giving ``grad sum_i w_i log q(z_i | x_t)``: a
            one-hot row is the guidance field of one dimension alone. An encoder with noise bands
            (``encoder.guidance_weights(timestep)``, e.g. :class:`~sami_adapter.SAMIEncoder` with
            ``guidance_bands``) multiplies in its own 0/1 weights, so each dimension guides only at
            the noise levels it is assigned.

    Returns:
        A tensor shaped like ``sample``.
    """
    with torch.enable_grad():
        x = sample.detach().requires_grad_(True)
        posterior = encoder(x, timestep)
        mean, logvar = posterior.mean, posterior.logvar
        if z.shape != mean.shape:
            raise ValueError(f"z has shape {tuple(z.shape)} but the encoder's posterior has shape {tuple(mean.shape)}.")
        z = z.to(mean.dtype)
        log_q = diagonal_gaussian_log_density(z, mean, logvar, normalised=False)
        band = encoder.guidance_weights(timestep, mean.shape[0]) if hasattr(encoder, "guidance_weights") else None
        for weights in (band, dim_weights):
            if weights is not None:
                log_q = log_q * weights.to(log_q)
        log_q = log_q.sum()
        if not log_q.requires_grad:  # a posterior that ignores its input has zero score
            return torch.zeros_like(sample)
        (score,) = torch.autograd.grad(log_q, x, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(sample) if score is None else score


@contextmanager
def frozen_parameters(module: Optional[torch.nn.Module]) -> Iterator[None]:
    """``module``'s parameters without ``requires_grad`` inside the block, restored after. A score taken
    for sampling (:func:`posterior_score` needs gradients for ``x_t`` only) then records no graph for
    the weights: the same values, a cheaper guided step."""
    params = [] if module is None else [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def apply_guidance(
    model_output: torch.Tensor,
    score: torch.Tensor,
    scheduler: Any,
    timestep: TimestepLike,
    sample: torch.Tensor,
    sami_scale: float = 1.0,
) -> torch.Tensor:
    """The guided model output in the scheduler's ``prediction_type``.

    With ``w = sami_scale`` and ``(a_t, s_t)`` from :func:`noise_level`:

    * ``epsilon``:      ``eps_theta - w s_t g``          (3)
    * ``sample``:       ``x0_theta + w (s_t^2 / a_t) g``  (4)
    * ``v_prediction``: ``v_theta - w (s_t / a_t) g``     (5)

    Args:
        model_output: the UNet's output for ``sample``.
        score: ``grad_{x_t} log q(z | x_t)`` from :func:`posterior_score`, shaped like ``sample``.
        scheduler: the diffusers scheduler driving the loop (gives prediction type and noise level).
        timestep: the current timestep (scalar or per-sample).
        sample: the UNet input ``x_t`` (after ``scale_model_input``).
        sami_scale: multiplies the posterior score; 1 is the Bayes-exact SAMI decoder, 0 turns SAMI off.
    """
    if score.shape != model_output.shape or sample.shape != model_output.shape:
        raise ValueError(
            f"model_output {tuple(model_output.shape)}, score {tuple(score.shape)} and sample {tuple(sample.shape)} must have the same shape."
        )
    alpha, sigma = noise_level(scheduler, timestep, model_output.shape[0], model_output.device)
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    return guided_output(model_output, score, alpha, sigma, prediction_type, sami_scale)


def clean_guidance_coefficient(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``s_t^2 / a_t`` of (4): how far the score moves the clean estimate ``x0_hat``; 0 where ``a_t = 0`` (see :func:`guided_output`)."""
    safe_alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    return torch.where(alpha > 0, sigma**2 / safe_alpha, torch.zeros_like(alpha))


def _per_sample(coefficient: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coefficient.view((-1,) + (1,) * (like.ndim - 1)).to(like.dtype)


def guided_output(
    model_output: torch.Tensor,
    score: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str = "epsilon",
    sami_scale: float = 1.0,
) -> torch.Tensor:
    """Equations (3)-(5) for known per-sample ``alpha = a_t`` and ``sigma = s_t`` (each (B,)), with the
    posterior score ``score`` multiplied by ``sami_scale``."""
    # At zero SNR (a_t = 0, the last step of a zero-terminal-SNR schedule) x_t says nothing about
    # x_0: the exact posterior's score vanishes, and (3) keeps its finite value -s_t g. The x0 and v
    # forms divide by a_t there; their limit is not a function of the score at that one point, so
    # that single model call stays unguided (the following steps, with a_t > 0, carry the guidance).
    safe_alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    if prediction_type == "epsilon":
        coefficient = -sigma  # (3)
    elif prediction_type == "sample":
        coefficient = clean_guidance_coefficient(alpha, sigma)  # (4)
    elif prediction_type == "v_prediction":
        coefficient = torch.where(alpha > 0, -sigma / safe_alpha, torch.zeros_like(alpha))  # (5)
    else:
        raise ValueError(f"Unsupported prediction_type {prediction_type!r}; expected 'epsilon', 'sample' or 'v_prediction'.")
    return model_output + _per_sample(sami_scale * coefficient, model_output) * score.to(model_output.dtype)


def to_epsilon(
    model_output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Convert a model output to a noise prediction using (1): ``x0 -> (x_t - a x0) / s``, ``v -> a v + s x_t``."""
    if prediction_type == "epsilon":
        return model_output
    a, s = _per_sample(alpha, model_output), _per_sample(sigma, model_output)
    if prediction_type == "sample":
        return (sample - a * model_output) / s
    if prediction_type == "v_prediction":
        return a * model_output + s * sample
    raise ValueError(f"Unsupported prediction_type {prediction_type!r}; expected 'epsilon', 'sample' or 'v_prediction'.")
