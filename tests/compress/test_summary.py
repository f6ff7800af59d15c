"""The before/after table `picpq compress` prints."""

from picpq_jax.compress.summary import before_after_table, run_length


def test_run_length():
  assert run_length([32, 8, 8, 8, 6]) == "32,8x3,6"
  assert run_length([4]) == "4"
  assert run_length([2, 3, 2]) == "2,3,2"


def test_before_after_table_hand_worked():
  record = {
      "baseline": {"val": {"accuracy": 0.85}}, "final": {"val": {"accuracy": 0.8}},
      "cost": {"flops_full": 1000.0, "flops": 400.0, "flops_ratio": 2.5,
               "bops_full": 32_000.0, "bops": 1000.0, "bops_ratio": 32.0},
      "deployed": {"baseline_float32_bytes": 4000, "file_bytes": 500},
      "layers": [{"w_bits": 32}, {"w_bits": 6}, {"w_bits": 6}, {"w_bits": 32}],
  }
  lines = before_after_table(record).splitlines()
  assert lines[2] == "| validation accuracy | 0.8500 | 0.8000 | -5.00 points |"
  assert lines[3] == "| FLOPs (MACs / image) | 1,000 | 400 | 2.50x fewer |"
  assert lines[4] == "| BOPs / image | 32,000 | 1,000 | 32.00x fewer |"
  assert lines[5] == "| bytes on disk (float32 / packed) | 4,000 | 500 | 8.0x smaller |"
  assert lines[6] == "| weight bits per layer | 32x4 | 32,6x2,32 |  |"
