"""PIC-PQ on the UE side: the quantized encoder's cost against a hand count."""

import pytest

from picpq_jax.csi import edge
from picpq_jax.errors import UserError

# CsiNet's encoder at CR 16 counted by hand: conv 3x3, 2 -> 2 channels with bias on
# 32 x 32 positions; dense 2048 -> 128 with bias.
CONV_W, CONV_B, FC_W, FC_B = 3 * 3 * 2 * 2, 2, 2048 * 128, 128
CONV_MACS, FC_MACS = 32 * 32 * CONV_W, FC_W


@pytest.mark.parametrize("w_bits", [32, 4])
def test_csinet_encoder_cost_matches_a_hand_count(w_bits):
  encoder = edge.quantized_encoder("csinet", 16)
  got = edge.encoder_cost(encoder, edge.encoder_quant(encoder, w_bits))
  params = CONV_W + CONV_B + FC_W + FC_B
  assert got["flops"] == CONV_MACS + FC_MACS == 299_008
  assert got["params"] == params == 262_310
  # BOPs: a conv's MACs x w x a, a dense layer's params x w x a (activations at 32 bits).
  assert got["bops"] == (CONV_MACS + FC_W + FC_B) * w_bits * 32
  assert got["bytes"] == params * w_bits / 8
  assert edge.encoder_cost(encoder) == edge.encoder_cost(encoder, edge.encoder_quant(encoder, 32))


def test_mixed_bits_price_each_layer_at_its_own_bits():
  encoder = edge.quantized_encoder("csinet", 16)
  got = edge.encoder_cost(encoder, edge.encoder_quant(encoder, 4, conv_w_bits=8))
  assert got["bops"] == CONV_MACS * 8 * 32 + (FC_W + FC_B) * 4 * 32
  assert got["bytes"] == ((CONV_W + CONV_B) * 8 + (FC_W + FC_B) * 4) / 8



def test_bits_outside_the_quantizers_range_are_a_user_error():
  with pytest.raises(UserError, match="w_bits=1"):
    edge.encoder_quant(edge.quantized_encoder("csinet", 16), 1)
