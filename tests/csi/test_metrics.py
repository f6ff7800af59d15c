"""NMSE and rho against a numpy transcription of CsiNet's reference evaluation."""

import numpy as np
import pytest

from picpq_jax.csi import domain, metrics


def reference_nmse_rho(x_test, x_hat, hf_test):
  """CsiNet's reference evaluation (Keras release), transcribed: channels-first
  ``[N, 2, 32, 32]`` inputs, ``HF [N, 32, 125]``; returns (NMSE dB, rho)."""
  n = len(x_test)
  x_test_c = (x_test[:, 0].reshape(n, -1) - 0.5) + 1j * (x_test[:, 1].reshape(n, -1) - 0.5)
  x_hat_c = (x_hat[:, 0].reshape(n, -1) - 0.5) + 1j * (x_hat[:, 1].reshape(n, -1) - 0.5)
  x_hat_f = x_hat_c.reshape(n, 32, 32)
  big = np.fft.fft(np.concatenate([x_hat_f, np.zeros((n, 32, 257 - 32))], axis=2), axis=2)
  big = big[:, :, :125]
  n1 = np.sqrt(np.sum(np.conj(hf_test) * hf_test, axis=1)).real
  n2 = np.sqrt(np.sum(np.conj(big) * big, axis=1)).real
  aa = np.abs(np.sum(np.conj(hf_test) * big, axis=1))
  rho = np.mean(aa / (n1 * n2), axis=1)
  power = np.sum(np.abs(x_test_c) ** 2, axis=1)
  mse = np.sum(np.abs(x_test_c - x_hat_c) ** 2, axis=1)
  return 10 * np.log10(np.mean(mse / power)), np.mean(rho)


def nhwc(x_cf):
  return np.ascontiguousarray(x_cf.transpose(0, 2, 3, 1))


@pytest.fixture
def matrices():
  """Hand-made channels-first samples: a sparse angular-delay pattern and noise."""
  rng = np.random.default_rng(0)
  x = np.full((3, 2, 32, 32), 0.5)
  x[0, 0, 3, 0], x[0, 1, 3, 1], x[0, 0, 10, 2] = 0.9, 0.2, 0.7  # a few paths
  x[1, :, 16, :4] = [[0.8, 0.6, 0.55, 0.52], [0.3, 0.45, 0.5, 0.49]]
  x[2] = rng.uniform(0.3, 0.7, (2, 32, 32))
  x_hat = np.clip(x + rng.normal(0, 0.02, x.shape), 0, 1)
  hf = rng.normal(size=(3, 32, 125)) + 1j * rng.normal(size=(3, 32, 125))
  return x, x_hat, hf


def test_nmse_and_rho_match_the_reference_transcription(matrices):
  x, x_hat, hf = matrices
  want_nmse, want_rho = reference_nmse_rho(x, x_hat, hf)
  assert float(metrics.nmse_db(nhwc(x), nhwc(x_hat))) == pytest.approx(want_nmse, abs=1e-4)
  assert float(metrics.rho(hf, nhwc(x_hat))) == pytest.approx(want_rho, abs=1e-5)


def test_nmse_averages_linear_ratios_before_the_log():
  # Sample 0 is off by 10 % (ratio 0.01), sample 1 by 100 % (ratio 1): 10 log10(0.505).
  x = np.full((2, 32, 32, 2), 0.5)
  x[:, 0, 0, 0] = 0.7
  x_hat = x.copy()
  x_hat[0, 0, 0, 0] = 0.5 + 0.9 * 0.2
  x_hat[1, 0, 0, 0] = 0.5
  assert float(metrics.nmse_db(x, x_hat)) == pytest.approx(10 * np.log10(0.505), abs=1e-4)
  np.testing.assert_allclose(metrics.nmse_per_sample(x, x_hat), [0.01, 1.0], rtol=1e-4)


def test_rho_is_one_for_a_scaled_or_phase_rotated_reconstruction(matrices):
  x, _, _ = matrices
  x = nhwc(x)
  hf = domain.frequency_response(x)
  h = domain.to_complex(x) * 0.5j  # scaled by 0.5, rotated by 90 degrees
  x_rot = 0.5 + np.stack([h.real, h.imag], -1)
  assert float(metrics.rho(hf, x_rot)) == pytest.approx(1.0, abs=1e-5)
  assert float(metrics.nmse_db(x, x_rot)) > 0.0  # yet far off in NMSE


def test_metrics_run_under_jit(matrices):
  import jax
  x, x_hat, hf = (nhwc(matrices[0]), nhwc(matrices[1]), matrices[2])
  assert float(jax.jit(metrics.nmse_db)(x, x_hat)) == pytest.approx(
      float(metrics.nmse_db(x, x_hat)), abs=1e-5)
  assert float(jax.jit(metrics.rho)(hf, x_hat)) == pytest.approx(
      float(metrics.rho(hf, x_hat)), abs=1e-6)
