"""The one loop on a toy task: resume equals an uninterrupted run (state and metric
records, a partial record window included), and SIGTERM/SIGKILL in a subprocess."""

import signal
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np

from picpq_jax import engine
from picpq_jax.utils import read_jsonl
from tests.engine.harness import interrupt_after_first_checkpoint


def toy_task(total: int = 12, delay: float = 0.0) -> engine.Task:
  """``w <- 0.5 w + batch``; batch ``i`` is ``i``; a record every 4 steps, and an
  evaluation every 3."""
  def step(state, batch, index):
    time.sleep(delay)
    return {"w": state["w"] * 0.5 + batch}, {"loss": jnp.sum(state["w"]), "index": index}

  def batches(start):
    i = start
    while True:
      yield jnp.float32(i)
      i += 1

  init = {"w": jnp.arange(4, dtype=jnp.float32)}
  return engine.Task(init=lambda: init, template=init, total=total, batches=batches,
                     step=step, evaluate=lambda s, d: {"norm": float(jnp.sum(s["w"]))}
                     if d % 3 == 0 else {}, log_every=4, meta={"what": "toy"})


def test_resume_repeats_the_uninterrupted_run(tmp_path):
  whole = engine.run_task(toy_task(), str(tmp_path / "a"), progress=False)
  part = engine.run_task(toy_task(), str(tmp_path / "b"), progress=False, stop_at=5)
  assert part.step == 5
  rest = engine.run_task(toy_task(), str(tmp_path / "b"), progress=False)
  assert rest.start == 5 and rest.step == 12
  np.testing.assert_array_equal(whole.state["w"], rest.state["w"])
  assert read_jsonl(tmp_path / "a" / "metrics.jsonl") == read_jsonl(tmp_path / "b" /
                                                                     "metrics.jsonl")
  assert whole.records == rest.records
  assert [r["step"] for r in whole.records if "loss" in r] == [4, 8, 12]


SCRIPT = """
import sys
from picpq_jax import engine
from tests.engine.test_loop import toy_task
try:
  engine.run_task(toy_task(delay=0.3), sys.argv[1], progress=False)
except engine.Interrupted as e:
  sys.exit(e.exit_code)
"""


def test_sigterm_and_sigkill_stop_a_run_that_resumes_exactly(tmp_path):
  whole = engine.run_task(toy_task(), str(tmp_path / "whole"), progress=False)
  work = str(tmp_path / "run")
  argv = [sys.executable, "-c", textwrap.dedent(SCRIPT), work]
  term = interrupt_after_first_checkpoint(argv, f"{work}/checkpoints",
                                          signal.SIGTERM)
  assert term.returncode == 143, term.stderr
  lines = term.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("picpq: SIGTERM: stopped after step "), lines
  stopped = engine.Checkpoints(f"{work}/checkpoints").latest_step()
  assert 1 <= stopped < 12
  kill = interrupt_after_first_checkpoint(argv, f"{work}/checkpoints",
                                          signal.SIGKILL, after=stopped)
  assert kill.returncode == -signal.SIGKILL
  rest = engine.run_task(toy_task(), work, progress=False)
  assert rest.start >= stopped and rest.step == 12
  np.testing.assert_array_equal(whole.state["w"], rest.state["w"])
  assert whole.records == rest.records
