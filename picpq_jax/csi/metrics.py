"""NMSE and cosine similarity rho, computed as CsiNet's reference code does.

Both take the decoder's output ``x_hat`` and the target ``x`` as NHWC
``[N, 32, 32, 2]`` in [0, 1] (0.5 = zero; see :mod:`picpq_jax.csi.domain`).

NMSE (dB), on the angular-delay matrix. Centre both (``- 0.5``), form complex
``H = Re + j Im`` ``[N, 32, 32]``, take per sample
``e_n = sum |H_n - H_hat_n|^2 / sum |H_n|^2`` (sums over all 32 x 32 entries), then
``NMSE = 10 log10(mean_n e_n)``: the mean of the linear ratios, then the log (not
a mean of per-sample dB values). Over several batches, average
:func:`nmse_per_sample` and take the log once (:func:`to_db`).

rho, in frequency. Centre ``x_hat``, zero-pad its delay axis (the last of the 32 x
32 matrix) to 257 points, FFT over it, keep the first 125 bins:
``H_hat_f [N, 32, 125]``. With the target ``HF [N, 32, 125]`` (``HF_all`` of the
COST2100 files, or :func:`picpq_jax.csi.domain.frequency_response` of generated
data), per sample and subcarrier ``k``:
``rho_{n,k} = |h_k^H h_hat_k| / (||h_k|| ||h_hat_k||)`` over the 32 antennas, then
the mean over subcarriers and samples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from picpq_jax.csi.domain import RHO_CARRIERS, RHO_FFT

Array = jax.Array


def _centred(x: Array) -> Array:
  """NHWC ``[N, 32, 32, 2]`` in [0, 1] -> complex ``[N, 32, 32]`` minus 0.5."""
  x = jnp.asarray(x, jnp.float32) - 0.5
  return jax.lax.complex(x[..., 0], x[..., 1])


def nmse_per_sample(x: Array, x_hat: Array) -> Array:
  """Linear NMSE of each sample, float32 ``[N]``: ``||H - H_hat||^2 / ||H||^2``."""
  h, h_hat = _centred(x), _centred(x_hat)
  power = jnp.sum(jnp.abs(h) ** 2, axis=(1, 2))
  return jnp.sum(jnp.abs(h - h_hat) ** 2, axis=(1, 2)) / power


def to_db(linear: Array) -> Array:
  """``10 log10(linear)``."""
  return 10.0 * jnp.log10(linear)


def nmse_db(x: Array, x_hat: Array) -> Array:
  """NMSE in dB of a batch: ``10 log10(mean_n nmse_per_sample)``; a float32 scalar."""
  return to_db(jnp.mean(nmse_per_sample(x, x_hat)))


def frequency(x_hat: Array) -> Array:
  """NHWC ``[N, 32, 32, 2]`` -> complex64 ``[N, 32, 125]``: centred, delay axis
  zero-padded to 257 points, FFT over it, first 125 bins."""
  h = _centred(x_hat)
  h = jnp.pad(h, ((0, 0), (0, 0), (0, RHO_FFT - h.shape[2])))
  return jnp.fft.fft(h, axis=2)[:, :, :RHO_CARRIERS]


def rho_per_sample(hf: Array, x_hat: Array) -> Array:
  """Cosine similarity of each sample averaged over its 125 subcarriers, ``[N]``.

  Args:
    hf: complex ``[N, 32, 125]`` target frequency response.
    x_hat: NHWC ``[N, 32, 32, 2]`` reconstruction in [0, 1].
  """
  h = jnp.asarray(hf, jnp.complex64)
  h_hat = frequency(x_hat)
  cross = jnp.abs(jnp.sum(jnp.conj(h) * h_hat, axis=1))
  norms = jnp.linalg.norm(h, axis=1) * jnp.linalg.norm(h_hat, axis=1)
  return jnp.mean(cross / norms, axis=1)


def rho(hf: Array, x_hat: Array) -> Array:
  """Mean cosine similarity over samples and subcarriers; a float32 scalar."""
  return jnp.mean(rho_per_sample(hf, x_hat))
