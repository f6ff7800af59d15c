"""``run_federated`` end to end on 4 simulated devices: the methods, per-round
checkpoints, a resumed run equal to an uninterrupted one, exact bytes, the report;
and ``picpq federated`` stopped by SIGTERM and SIGKILL, then resumed."""

import signal
import sys

from picpq_jax import cli, engine
from tests.engine.harness import assert_same_run, interrupt_after_first_checkpoint, tree_files

SCRIPT = """
import json, os, sys
import numpy as np
from picpq_jax.errors import UserError
from picpq_jax.federated import FederatedConfig, run_federated

work, cache = sys.argv[1], sys.argv[2]
common = dict(arch="resnet8", data="embedded", cache_dir=cache, val_size=16, train_size=64,
              clients=4, participation=0.5, partition="dirichlet", alpha=1.0, min_client_size=4,
              rounds=2, local_steps=1, batch_size=4, smashed_bits=4, progress=False,
              methods="splitfed,fedavg,centralized")  # sequential: see test_rounds.py
quiet = lambda *a: None
config = FederatedConfig(workdir=f"{work}/a", **common)
first = run_federated(config, stop_after_round=1, print_fn=quiet)
assert all(r["rounds"] == 1 for r in first["runs"].values()), first["runs"]
try:
  run_federated(config, print_fn=quiet)
  raise AssertionError("a second run without --resume must refuse to overwrite")
except UserError as e:
  assert "--resume" in str(e), e
resumed = run_federated(FederatedConfig(workdir=f"{work}/a", resume=True, **common), print_fn=quiet)
assert sorted(resumed["runs"]) == ["centralized", "fedavg", "splitfed-4bit"]
assert all(r["rounds"] == 2 for r in resumed["runs"].values())
for f in ("results.json", "report.md", "plot.png", "splitfed-4bit/metrics.jsonl"):
  assert os.path.getsize(f"{work}/a/{f}") > 0, f

# The resumed SplitFed run repeats an uninterrupted one.
whole = run_federated(FederatedConfig(workdir=f"{work}/b", **{**common, "methods": "splitfed"}),
                      print_fn=quiet)
a, b = resumed["runs"]["splitfed-4bit"]["curve"], whole["runs"]["splitfed-4bit"]["curve"]
for x, y in zip(a, b):
  np.testing.assert_allclose([x["train_loss"], x["val_loss"]], [y["train_loss"], y["val_loss"]],
                             rtol=1e-5)

# Bytes: two participants, one local step, 4-bit smashed data [4, 32, 32, 16] at cut 1.
rec = [json.loads(l) for l in open(f"{work}/a/splitfed-4bit/metrics.jsonl")]
msg = 4 * 32 * 32 * 16 * 4 // 8 + 8
assert rec[0]["up"]["smashed"] == rec[0]["down"]["gradients"] == 2 * msg
assert rec[0]["up"]["labels"] == 2 * 4 * 4
assert rec[0]["fp32_total_bytes"] - rec[0]["total_bytes"] == 2 * 2 * (4 * 32 * 32 * 16 * 4 - msg)
fed = json.loads(open(f"{work}/a/fedavg/metrics.jsonl").readline())
assert fed["up_bytes"] == fed["down_bytes"] == 2 * fed["up"]["model"] // 2
cen = [json.loads(l) for l in open(f"{work}/a/centralized/metrics.jsonl")]
assert cen[0]["up_bytes"] == 64 * 32 * 32 * 3 + 64 * 4 and cen[1]["total_bytes"] == 0
summary = resumed["runs"]["splitfed-4bit"]
assert summary["total_bytes"] == sum(r["total_bytes"] for r in rec)
assert resumed["client_sizes"] and sum(resumed["client_sizes"]) == 64
print("OK")
"""


def test_run_resume_bytes_and_report(on_devices, tmp_path, cache_dir):
  on_devices(SCRIPT.replace("sys.argv[1], sys.argv[2]", f"{str(tmp_path)!r}, {cache_dir!r}"),
             devices=4)


def _argv(cache_dir, workdir, *extra):
  return ["federated", "--arch", "resnet8", "--data", "embedded", "--val-size", "16",
          "--train-size", "32", "--clients", "2", "--methods", "fedavg", "--rounds", "6",
          "--local-steps", "1", "--batch-size", "4", "--no-progress", "--no-plot",
          "--cache-dir", cache_dir, "--workdir", str(workdir), *extra]


def test_sigterm_sigkill_resume_and_resume_options(tmp_path, cache_dir, capsys):
  """As tests/train/test_loop.py's test of the same name, for FedAvg rounds."""
  assert cli.main(_argv(cache_dir, tmp_path / "full")) == 0
  work = tmp_path / "split"
  ckpts = str(work / "fedavg" / "checkpoints")
  command = [sys.executable, "-m", "picpq_jax.cli", *_argv(cache_dir, work)]
  term = interrupt_after_first_checkpoint(command, ckpts, signal.SIGTERM)
  lines = term.stderr.strip().splitlines()
  assert term.returncode == 143 and lines[-1].startswith("picpq: SIGTERM: stopped after round")
  assert len(lines) == 1, lines
  stopped = engine.Checkpoints(ckpts).latest_step()
  kill = interrupt_after_first_checkpoint([*command, "--resume"], ckpts, signal.SIGKILL,
                                          after=stopped)
  assert kill.returncode == -signal.SIGKILL
  capsys.readouterr()
  before = tree_files(work)
  assert cli.main(_argv(cache_dir, work, "--resume", "--lr", "0.1")) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "made with --lr=0.05, not 0.1" in err[0], err
  assert tree_files(work) == before
  assert cli.main(_argv(cache_dir, work, "--resume")) == 0

  assert_same_run(f"{tmp_path}/full/fedavg", f"{work}/fedavg", timing="round_time_s")
  assert cli.main(_argv(cache_dir, work, "--resume", "--rounds", "7")) == 0
  assert engine.Checkpoints(ckpts).latest_step() == 7
