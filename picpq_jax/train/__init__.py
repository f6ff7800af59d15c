"""Training: jitted steps, schedules, Orbax checkpoints, metrics, the training loop."""

from picpq_jax.train.checkpoint import Checkpoints
from picpq_jax.train.config import TrainConfig
from picpq_jax.train.loop import train
from picpq_jax.train.loop import train_and_evaluate
from picpq_jax.train.metrics import JsonlWriter
from picpq_jax.train.metrics import read_jsonl
from picpq_jax.train.optim import cosine_schedule
from picpq_jax.train.optim import make_schedule
from picpq_jax.train.optim import multistep_schedule
from picpq_jax.train.optim import sgd_nesterov
from picpq_jax.train.steps import TrainState
from picpq_jax.train.steps import create_train_state
from picpq_jax.train.steps import eval_step
from picpq_jax.train.steps import train_step
