"""Shared by the run tests of every command: the ways a checkpoint gets damaged
(issue 14), applied to ``<checkpoints>/<step>``, and a subprocess stopped by a signal
after its first checkpoint."""

import os
import subprocess
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def data_file(step_dir: str) -> str:
  """The largest file of the state's OCDBT data: where the arrays' bytes live."""
  folder = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  files = [os.path.join(folder, f) for f in os.listdir(folder)]
  return max(files, key=os.path.getsize)


def random_bytes(step_dir: str) -> None:
  """4 KB of random bytes written over the start of the data file."""
  with open(data_file(step_dir), "r+b") as f:
    f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def flip_bit(step_dir: str) -> None:
  """One bit flipped in the middle of the data file."""
  path = data_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x10]))


def truncate(step_dir: str) -> None:
  """The data file cut to half its length."""
  path = data_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def empty_meta(step_dir: str) -> None:
  """The JSON metadata emptied."""
  open(os.path.join(step_dir, "meta", "metadata"), "w").close()


def delete_metadata(step_dir: str) -> None:
  """The state's ``_METADATA`` deleted."""
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def empty_manifest(step_dir: str) -> None:
  """The state's ``manifest.ocdbt`` emptied."""
  open(os.path.join(step_dir, "state", "manifest.ocdbt"), "w").close()


DAMAGES = (random_bytes, flip_bit, truncate, empty_meta, delete_metadata, empty_manifest)


def interrupt_after_first_checkpoint(argv: list[str], checkpoints: str, signum: int,
                                     after: int = 0, timeout: float = 300
                                     ) -> subprocess.CompletedProcess:
  """Runs ``argv`` (from the repository root), sends ``signum`` as soon as a checkpoint
  of a step past ``after`` appears in ``checkpoints``, and returns the finished
  process (stderr as text)."""
  proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT})
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(checkpoints) and any(d.isdigit() and int(d) > after
                                          for d in os.listdir(checkpoints)):
      proc.send_signal(signum)
      break
    time.sleep(0.01)
  out, err = proc.communicate(timeout=timeout)
  return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def tree_files(root) -> list:
  """``(folder, file, mtime)`` of every file under ``root``: "nothing written" checks."""
  return sorted((p, f, os.path.getmtime(os.path.join(p, f)))
                for p, _, files in os.walk(root) for f in files)


def assert_same_run(a: str, b: str, timing: str) -> None:
  """The runs in folders ``a`` and ``b`` ended with bit-identical newest checkpoints and
  the same metric records (the wall-clock field ``timing`` aside)."""
  import jax  # pylint: disable=import-outside-toplevel
  from picpq_jax import engine  # pylint: disable=import-outside-toplevel
  from picpq_jax.utils import read_jsonl  # pylint: disable=import-outside-toplevel
  states = []
  for folder in (a, b):
    checkpoints = engine.Checkpoints(os.path.join(folder, "checkpoints"))
    states.append(checkpoints.restore(None)[0])
    checkpoints.close()
  assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
  for x, y in zip(*map(jax.tree.leaves, states)):
    np.testing.assert_array_equal(x, y)
  records = [[{k: v for k, v in r.items() if k != timing}
              for r in read_jsonl(os.path.join(folder, "metrics.jsonl"))] for folder in (a, b)]
  assert records[0] == records[1]
