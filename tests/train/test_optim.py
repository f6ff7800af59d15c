"""Schedules and the optimizer against hand computations and a numpy transcription
of PyTorch's SGD update rule."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from picpq_jax.train import optim


def test_multistep_schedule_drops_by_gamma_at_fractions_of_training():
  sched = optim.multistep_schedule(0.01, 100, milestones=(0.3, 0.6, 0.8), gamma=0.2)
  expected = {0: 0.01, 29: 0.01, 30: 0.002, 59: 0.002, 60: 0.0004, 79: 0.0004, 80: 0.00008, 99: 0.00008}
  for step, lr in expected.items():
    assert float(sched(step)) == pytest.approx(lr, rel=1e-6), step


def test_cosine_schedule_matches_formula():
  sched = optim.cosine_schedule(0.1, 50)
  for step in (0, 10, 25, 49, 50):
    assert float(sched(step)) == pytest.approx(0.05 * (1 + np.cos(np.pi * step / 50)), abs=1e-7)


def test_cosine_warmup_is_linear_then_peaks():
  sched = optim.cosine_schedule(0.2, 100, warmup_steps=10)
  assert float(sched(0)) == pytest.approx(0.0)
  assert float(sched(5)) == pytest.approx(0.1)
  assert float(sched(10)) == pytest.approx(0.2)


def test_cosine_with_end_lr_is_crnets_warmup_cosine_annealing():
  """CRNet's WarmUpCosineAnnealingLR: base * t / Tw in the warm-up, then
  eta_min + (base - eta_min) * (1 + cos(pi * (t - Tw) / (Tmax - Tw))) / 2."""
  base, eta_min, t_max, t_warm = 2e-3, 5e-5, 120, 20
  sched = optim.make_schedule("cosine", base, t_max, warmup_steps=t_warm, end_lr=eta_min)
  for t in (0, 7, 20, 33, 70, 119, 120):
    want = (base * t / t_warm if t < t_warm else
            eta_min + (base - eta_min) * (1 + np.cos(np.pi * (t - t_warm) / (t_max - t_warm))) / 2)
    assert float(sched(t)) == pytest.approx(want, rel=1e-5)
  no_warmup = optim.cosine_schedule(base, t_max, end_lr=eta_min)
  assert float(no_warmup(t_max)) == pytest.approx(eta_min, rel=1e-5)
  assert float(no_warmup(60)) == pytest.approx(eta_min + (base - eta_min) / 2, rel=1e-5)


@pytest.mark.parametrize("name", ["constant", "cosine", "multistep"])
def test_step_rates_gives_one_rate_per_local_step(name):
  """A round's learning rates are ``[E]`` for every schedule: optax's constant schedule
  returns one scalar, which a round program indexing ``lrs[t]`` cannot take."""
  sched = optim.make_schedule(name, 0.1, 100)
  rates = np.asarray(optim.step_rates(sched, 20, 5))
  assert rates.shape == (5,) and rates.dtype == np.float32
  np.testing.assert_allclose(rates, [float(sched(t)) for t in range(20, 25)], rtol=1e-6)


def test_unknown_schedule_is_rejected():
  with pytest.raises(ValueError, match="unknown schedule"):
    optim.make_schedule("linear", 0.1, 10)


def test_sgd_nesterov_matches_pytorch_update_rule():
  """PyTorch SGD: g += wd*p; buf = m*buf + g (buf=g at first); g += m*buf; p -= lr*g."""
  lr, m, wd = 0.05, 0.9, 5e-4
  rng = np.random.default_rng(0)
  p0 = rng.normal(size=(4, 3)).astype(np.float32)
  grads = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(4)]

  p, buf = p0.copy(), None
  for g in grads:
    g = g + wd * p
    buf = g.copy() if buf is None else m * buf + g
    p = p - lr * (g + m * buf)

  tx = optim.sgd_nesterov(lr, momentum=m, weight_decay=wd)
  params = jnp.asarray(p0)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(np.asarray(params), p, rtol=1e-5, atol=1e-6)
