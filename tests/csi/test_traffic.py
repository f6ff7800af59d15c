"""Bytes per round worked by hand, and the round-time model on a hand-worked example."""

import jax
import jax.numpy as jnp
import pytest

from picpq_jax.csi import get_csi_model
from picpq_jax.csi import traffic


def test_split_bytes_by_hand():
  # CR 16: M = 128. B = 32, E = 5, float32 codewords and targets.
  t = traffic.split_traffic(128, 32, 5)
  assert t.up == {"codewords": 5 * 32 * 128 * 4, "targets": 5 * 32 * 2048 * 4}
  assert t.down == {"gradients": 5 * 32 * 128 * 4}
  # 4-bit codewords: ceil(32*128*4/8) = 2048 bytes + 8 for the range, per step;
  # 8-bit targets: 32*2048 bytes + 8.
  q = traffic.split_traffic(128, 32, 5, bits=4, target_bits=8)
  assert q.up == {"codewords": 5 * (2048 + 8), "targets": 5 * (65536 + 8)}
  assert q.down == {"gradients": 81920}


def test_fedavg_and_encoder_exchange_bytes_by_hand():
  model = get_csi_model("csinet", 4)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 2)), train=False))
  # CsiNet CR 4: encoder conv 3*3*2*2+2 = 38, BN scale+bias 4, dense 2048*512+512;
  # decoder dense 512*2048+2048, refine blocks 2 x (3*3*2*8+8 + 3*3*8*16+16 +
  # 3*3*16*2+2 = 1610, BN 2*(8+16+2) = 52), out conv 3*3*2*2+2 = 38.
  enc_params = 38 + 4 + 2048 * 512 + 512
  dec_params = 512 * 2048 + 2048 + 2 * (1610 + 52) + 38
  enc_stats = 4  # BN mean and var of 2 channels
  dec_stats = 2 * 2 * (8 + 16 + 2)
  f = traffic.fedavg_traffic(traffic.exchanged(v))
  whole = 4 * (enc_params + dec_params + enc_stats + dec_stats)
  assert f.up == {"model": whole} and f.down == {"model": whole}
  s = traffic.split_traffic(512, 32, 1, encoder=traffic.exchanged(v, "encoder"))
  assert s.up["encoder"] == s.down["encoder"] == 4 * (enc_params + enc_stats)
  c = traffic.centralized_traffic(100, target_bits=8)
  assert c.up == {"data": 100 * 2048 + 8} and c.down == {}
  assert traffic.centralized_traffic(100, first_round=False).up == {"data": 0}


def test_round_time_hand_worked():
  # 4 UEs, 2 local steps, 3 stages with forward 1, 2, 1 ms and backward 2, 4, 2 ms.
  timing = traffic.Timing(ue_forward=0.001, ue_backward=0.002, ue_step=0.010,
                          stage_forward=(0.001, 0.002, 0.001),
                          stage_backward=(0.002, 0.004, 0.002))
  t = traffic.Traffic(up={"x": 1000}, down={"y": 500})  # 8000 and 4000 bits
  plain = traffic.round_time("split", timing, t, 4, 2, uplink_bps=8e6, downlink_bps=4e6)
  # BTS per step: 4 micro-batches x (4 + 8) ms = 48 ms; 2 steps: 96 ms.
  assert plain["bts"] == pytest.approx(0.096)
  assert plain["ue"] == pytest.approx(0.006) and plain["link"] == pytest.approx(0.002)
  assert plain["total"] == pytest.approx(0.104) and plain["bubble"] == 0
  piped = traffic.round_time("pipeline", timing, t, 4, 2, uplink_bps=8e6, downlink_bps=4e6)
  # (4 + 3 - 1) ticks x (2 + 4) ms = 36 ms per step, 72 ms per round; bubble 2/6 of it.
  assert piped["bts"] == pytest.approx(0.072) and piped["bubble"] == pytest.approx(0.024)
  assert piped["total"] == pytest.approx(0.080)
  fed = traffic.round_time("fedavg", timing, t, 4, 2, uplink_bps=8e6, downlink_bps=4e6)
  assert fed["total"] == pytest.approx(0.020 + 0.002)
