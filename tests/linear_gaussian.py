"""A linear-Gaussian model with analytic scores and posteriors, for closed-form tests.

    z ~ N(0, I_k),   x_0 = A z + sigma_x n,   n ~ N(0, I_d),   x_t = a_t x_0 + s_t eps.

With ``c_t = a_t^2 sigma_x^2 + s_t^2``:
    p(x_t)     = N(0, a_t^2 (A A^T + sigma_x^2 I) + s_t^2 I)
    p(x_t | z) = N(a_t A z, c_t I)
    p(z | x_t) = N(S a_t A^T x_t / c_t, S),   S = (I + a_t^2 A^T A / c_t)^{-1}
A has orthogonal columns, so S is diagonal and a diagonal-Gaussian encoder can be exact.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

IMAGE_SHAPE = (1, 2, 2)  # d = 4 "pixels"


class LinearGaussian:
    def __init__(self, scales=(2.0, 0.7), sigma_x: float = 0.3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        d = int(torch.tensor(IMAGE_SHAPE).prod())
        q, _ = torch.linalg.qr(torch.randn(d, len(scales), generator=g, dtype=torch.float64))
        self.A = q * torch.tensor(scales, dtype=torch.float64)
        self.sigma_x = sigma_x
        self.d, self.k = d, len(scales)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, self.k, generator=generator, dtype=torch.float64)
        x = z @ self.A.T + self.sigma_x * torch.randn(n, self.d, generator=generator, dtype=torch.float64)
        return x.view(n, *IMAGE_SHAPE)

    @staticmethod
    def _flat(x):
        return x.reshape(x.shape[0], -1).to(torch.float64)

    def eps_unconditional(self, x_t, abar):
        """E[eps | x_t] = s Sigma_t^{-1} x_t."""
        a, s = abar.sqrt().view(-1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1)
        cov = a**2 * (self.A @ self.A.T + self.sigma_x**2 * torch.eye(self.d, dtype=torch.float64)) + s**2 * torch.eye(self.d, dtype=torch.float64)
        eps = s[:, :, 0] * torch.linalg.solve(cov, self._flat(x_t).unsqueeze(-1))[..., 0]
        return eps.view_as(x_t)

    def eps_conditional(self, x_t, z, abar):
        """E[eps | x_t, z] = s (x_t - a A z) / c_t."""
        a, s = abar.sqrt().view(-1, 1), (1 - abar).sqrt().view(-1, 1)
        c = a**2 * self.sigma_x**2 + s**2
        return (s * (self._flat(x_t) - a * (z.to(torch.float64) @ self.A.T)) / c).view_as(x_t)

    def posterior(self, x_t, abar):
        """Exact p(z | x_t) as an object with .mean and .logvar (diagonal since A^T A is diagonal)."""
        a, s = abar.sqrt().view(-1, 1), (1 - abar).sqrt().view(-1, 1)
        c = a**2 * self.sigma_x**2 + s**2
        ata = torch.diagonal(self.A.T @ self.A)
        var = 1.0 / (1.0 + a**2 * ata / c)
        mean = var * a * (self._flat(x_t) @ self.A) / c
        return SimpleNamespace(mean=mean, logvar=torch.log(var).expand_as(mean), var=var.expand_as(mean))

    def neg_log_marginal(self, x0):
        """-log p(x_0) per sample."""
        cov = self.A @ self.A.T + self.sigma_x**2 * torch.eye(self.d, dtype=torch.float64)
        dist = torch.distributions.MultivariateNormal(torch.zeros(self.d, dtype=torch.float64), covariance_matrix=cov)
        return -dist.log_prob(self._flat(x0))
