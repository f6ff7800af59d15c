"""CSI feedback: data, models and metrics of the field (CsiNet, CRNet, COST2100).

What was chosen where CsiNet's paper and code are silent (data generation,
normalization, layout, bias/initialization differences) is stated in
:mod:`picpq_jax.csi.domain`, :mod:`picpq_jax.csi.quadriga`, :mod:`picpq_jax.csi.models`
and :mod:`picpq_jax.csi.metrics`.
"""

from picpq_jax.csi.domain import (angular_delay, frequency_response, to_complex,
                                  to_unit_range)
from picpq_jax.csi.mat import load_hf, load_ht, read_mat
from picpq_jax.csi.metrics import nmse_db, nmse_per_sample, rho, rho_per_sample, to_db
from picpq_jax.csi.models import (ARCHITECTURES, COMPRESSION_RATIOS, CRBlock, CRNetDecoder,
                                  CRNetEncoder, CsiAutoencoder, CsiNetDecoder, CsiNetEncoder,
                                  RefineNet, codeword_size, decoder_stages, get_csi_model,
                                  init_csi_variables, layer_macs)
from picpq_jax.csi.quadriga import UeScenario, generate, ue_scenarios
