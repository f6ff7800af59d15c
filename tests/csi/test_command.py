"""``picpq csi``: one-line errors that write nothing, and a tiny run that resumes exactly."""

import json
import os

import numpy as np
import pytest
import scipy.io

from picpq_jax import cli
from picpq_jax.csi.config import CsiConfig
from picpq_jax.csi.run import learning_rates, run_csi
from picpq_jax.train import optim


def _mat(path, key="HT", n=24, width=2048, seed=0):
  rng = np.random.default_rng(seed)
  scipy.io.savemat(path, {key: rng.uniform(0.3, 0.7, size=(n, width)).astype(np.float32)})
  return str(path)


@pytest.mark.parametrize("args, needle", [
    (["--cr", "3"], "dividing 2048"),
    (["--stages", "5"], "use 1 to 4 stages"),
    (["--methods", "split,gossip"], "unknown gossip"),
    (["--bits", "1"], "--bits=1"),
    (["--test-per-ue", "80"], "--test-per-ue=80"),
    (["--arch", "resnet"], "unknown CSI architecture"),
    (["--ue-bits", "conv=8"], "needs conv and dense bits"),
    (["--ue-bits", "dense=two"], "is not 'conv=N,dense=N'"),
    (["--ue-bits", "8", "--methods", "fedavg"], "add split or pipeline"),
    (["--schedule", "step"], "--schedule='step'"),
    (["--end-lr", "0.001"], "--end-lr=0.001"),  # not below --lr (1e-3)
    (["--warmup-rounds", "4"], "fewer than --rounds"),
])
def test_bad_options_exit_2_and_write_nothing(tmp_path, capsys, args, needle):
  workdir = tmp_path / "run"
  assert cli.main(["csi", "--workdir", str(workdir), *args]) == 2
  err = capsys.readouterr().err.strip()
  assert needle in err and len(err.splitlines()) == 1, err
  assert not workdir.exists()


@pytest.mark.parametrize("make, needle", [
    (lambda d: _mat(d / "x.mat", key="H"), "has no 'HT' array"),
    (lambda d: _mat(d / "x.mat", width=1024), "must be real [N, 2048]"),
    (lambda d: _mat(d / "x.mat", n=10), "10 samples but --ues 2"),
])
def test_bad_mat_files_exit_2_and_write_nothing(tmp_path, capsys, make, needle):
  workdir = tmp_path / "run"
  path = make(tmp_path)
  argv = ["csi", "--workdir", str(workdir), "--data", path, "--ues", "2",
          "--samples-per-ue", "12", "--test-per-ue", "4"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert needle in err and len(err.splitlines()) == 1, err
  assert not os.path.exists(workdir / "config.json") and not (workdir / "split").exists()


def test_cosine_schedule_by_hand():
  """CRNet's recipe over rounds x local steps: 1 warm-up round of 5 steps (lr * t / 5),
  then cosine from the peak to end_lr over the other 15 steps."""
  c = CsiConfig(schedule="cosine", lr=2e-3, end_lr=5e-5, rounds=4, local_steps=5,
                warmup_rounds=1)
  got = np.asarray(optim.step_rates(learning_rates(c), 0, 21))
  t = np.arange(21)
  want = np.where(t < 5, 2e-3 * t / 5,
                  5e-5 + (2e-3 - 5e-5) * (1 + np.cos(np.pi * (t - 5) / 15)) / 2)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  constant = np.asarray(optim.step_rates(learning_rates(CsiConfig(lr=3e-3)), 8, 4))
  assert constant.shape == (4,) and np.all(constant == np.float32(3e-3))


def test_run_resumes_to_the_same_result(tmp_path):
  data = _mat(tmp_path / "ht.mat")
  common = dict(data=data, methods="split", ues=2, samples_per_ue=12, test_per_ue=4, cr=64,
                rounds=2, local_steps=1, batch_size=4, bits=8, progress=False, plot=False,
                ue_bits="conv=16,dense=12", ue_finetune_steps=1, schedule="cosine",
                warmup_rounds=1, end_lr=1e-4)
  full = run_csi(CsiConfig(workdir=str(tmp_path / "a"), **common), print_fn=lambda s: None)
  run_csi(CsiConfig(workdir=str(tmp_path / "b"), **common), stop_after_round=1,
          print_fn=lambda s: None)
  resumed = run_csi(CsiConfig(workdir=str(tmp_path / "b"), resume=True, **common),
                    print_fn=lambda s: None)
  a, b = full["runs"]["split"], resumed["runs"]["split"]
  assert a["rounds_done"] == b["rounds_done"] == 2
  assert a["curve"] == b["curve"]  # losses, NMSE, rho and bytes, round by round
  # bytes by hand: codewords [4, 32] at 8 bits (128 + 8), targets [4, 2048] float32,
  # gradients [4, 32] float32, one step per round.
  assert a["bytes_per_ue_round"] == (128 + 8) + 4 * 2048 * 4 + 4 * 32 * 4
  saved = json.loads((tmp_path / "b" / "results.json").read_text())
  assert saved["runs"]["split"]["nmse_db"] == b["nmse_db"]
  report = (tmp_path / "b" / "report.md").read_text()
  assert report.count("| Split (own encoders) |") == 1
  # --ue-bits: after training, every UE encoder quantized (and tuned) on the engine
  assert a["ue_compression"] == b["ue_compression"]
  q = b["ue_compression"]
  # CsiNet CR 64 encoder by hand: conv 3x3x2x2 + 2 bias, dense 2048 x 32 + 32 bias
  conv, dense = 3 * 3 * 2 * 2 + 2, 2048 * 32 + 32
  assert q["bits"] == {"conv": 16, "dense": 12}
  assert q["float_cost"]["bytes"] == (conv + dense) * 4
  assert q["cost"]["bytes"] == (conv * 16 + dense * 12) / 8
  assert q["cost"]["bops"] == (32 * 32 * 36 * 16 + dense * 12) * 32  # activations float
  # 12-bit weights barely move the reconstruction: NMSE and rho as the float encoder's
  assert abs(q["ptq"]["nmse_db"] - b["nmse_db"]) < 0.05
  assert abs(q["ptq"]["rho"] - b["rho"]) < 1e-3
  assert "conv 16 / dense 12 bits, fine-tuned" in report

