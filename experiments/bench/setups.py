"""The two sides of every comparison, built the same way: a library model with its
jitted train/inference step, and its PyTorch twin with the same step.

The train step is the library's own :func:`picpq_jax.train.steps.train_step` (SGD
with Nesterov momentum 0.9, lr 0.01, weight decay 5e-4, BN in training mode,
softmax cross-entropy) jitted with the state donated; PyTorch's is
``zero_grad, forward, cross_entropy, backward, SGD(nesterov).step``, eager or with
the whole step under ``torch.compile``. Inputs: float32 images (NHWC for JAX,
NCHW for PyTorch) and int labels, already on the device.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from picpq_jax import compile_options, models
from picpq_jax.train import create_train_state, sgd_nesterov, train_step

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


def jax_model(arch: str, seed: int = 0):
  """``(model, variables, structure)`` of the library model ``arch`` (He-init weights)."""
  model = models.get_model(arch)
  shape = models.get_spec(arch).input_shape
  variables = models.init_variables(model, jax.random.key(seed), shape)
  return model, variables, models.model_structure(model, shape)


def random_batch(batch: int, seed: int = 0, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """Normal float32 images ``[B, 32, 32, 3]`` (NHWC) and int32 labels ``[B]``."""
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((batch, 32, 32, 3), dtype=np.float32),
          rng.integers(0, num_classes, batch).astype(np.int32))


def train_flops(structure, batch: int) -> float:
  """FLOPs of one train step: 3x the forward's ``2 * MACs`` (forward, input and
  weight gradients), convolutions and dense layers only."""
  return 3 * infer_flops(structure, batch)


def infer_flops(structure, batch: int) -> float:
  """FLOPs of one forward pass, ``2 * MACs * batch``."""
  return 2.0 * structure.macs * batch


def compiler_options(option_set: str | None) -> dict[str, str] | None:
  """The named option set's ``compiler_options``, or the library's for ``None``."""
  if option_set is None:
    return compile_options.compiler_options()
  return compile_options.OPTION_SETS[option_set] or None


def jax_train(model, variables, step_fn: Callable = train_step,
              option_set: str | None = None,
              extra_options: dict[str, Any] | None = None) -> tuple[Callable, Any]:
  """``(step, state)``: ``step(state, images, labels) -> (state, metrics)`` jitted with
  the state donated, and a fresh train state. ``step_fn`` has
  :func:`~picpq_jax.train.steps.train_step`'s signature. Compiled with the library's
  XLA options (:mod:`picpq_jax.compile_options`), or the named ``option_set``, plus
  ``extra_options`` if given."""
  tx = sgd_nesterov(LR, MOMENTUM, WEIGHT_DECAY)
  options = compiler_options(option_set)
  if extra_options:
    options = {**(options or {}), **extra_options}
  step = jax.jit(functools.partial(step_fn, model=model, tx=tx), donate_argnums=0,
                 compiler_options=options)
  own = jax.tree_util.tree_map(jnp.copy, variables)  # the step donates (deletes) these
  return step, create_train_state(own, tx)


def jax_infer(model, option_set: str | None = None) -> Callable:
  """``infer(variables, images) -> logits``, jitted (options as :func:`jax_train`),
  BN in inference mode."""
  return jax.jit(functools.partial(model.apply, train=False),
                 compiler_options=compiler_options(option_set))


class JaxStepper:
  """Runs a donated train step repeatedly, threading the state (for timing)."""

  def __init__(self, step, state, images, labels):
    self.step, self.state = step, state
    self.images, self.labels = jnp.asarray(images), jnp.asarray(labels)

  def __call__(self):
    self.state, metrics = self.step(self.state, self.images, self.labels)
    jax.block_until_ready(metrics)
    return metrics


# ------------------------------------------------------------------------ PyTorch


def torch_model(arch: str, variables):
  """The PyTorch twin of ``arch`` holding the same weights as ``variables``."""
  from experiments.bench import torch_models
  return torch_models.load_flax_variables(torch_models.build(arch), variables)


def torch_nchw(images: np.ndarray):
  """NHWC numpy -> contiguous NCHW ``torch.Tensor``."""
  import torch
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def torch_train(module, compiled: bool, backend: str = "inductor") -> Callable:
  """``step(x, y) -> loss``: one SGD step of ``module`` (put in train mode);
  with ``compiled`` the whole step is wrapped in ``torch.compile(backend=backend)``."""
  import torch
  import torch.nn.functional as F
  module.train()
  opt = torch.optim.SGD(module.parameters(), lr=LR, momentum=MOMENTUM,
                        weight_decay=WEIGHT_DECAY, nesterov=True)

  def step(x, y):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(module(x), y)
    loss.backward()
    opt.step()
    return loss.detach()

  return torch.compile(step, backend=backend) if compiled else step


def torch_infer(module, compiled: bool, backend: str = "inductor") -> Callable:
  """``infer(x) -> logits`` in eval mode without autograd (optionally compiled)."""
  import torch
  module.eval()
  fn = torch.compile(module, backend=backend) if compiled else module

  def infer(x):
    with torch.inference_mode():
      return fn(x)

  return infer
