"""CSI feedback: data, models and metrics of the field (CsiNet, CRNet, COST2100).

What was chosen where CsiNet's paper and code are silent (data generation,
normalization, layout, bias/initialization differences) is stated in
:mod:`picpq_jax.csi.domain`, :mod:`picpq_jax.csi.quadriga`, :mod:`picpq_jax.csi.models`
and :mod:`picpq_jax.csi.metrics`.

The public names below load their module on first use (PEP 562), so that the
generator's worker processes, which import :mod:`picpq_jax.csi.quadriga`, do not
pay for importing JAX and Flax.
"""

import importlib

_EXPORTS = {
    "domain": ("angular_delay", "frequency_response", "to_complex", "to_unit_range"),
    "mat": ("COST2100_SCENARIOS", "cost2100_paths", "load_cost2100", "load_hf", "load_ht",
            "read_mat"),
    "metrics": ("nmse_db", "nmse_per_sample", "rho", "rho_per_sample", "to_db"),
    "models": ("ARCHITECTURES", "COMPRESSION_RATIOS", "CRBlock", "CRNetDecoder",
               "CRNetEncoder", "CsiAutoencoder", "CsiNetDecoder", "CsiNetEncoder",
               "RefineNet", "codeword_size", "decoder_stages", "get_csi_model",
               "init_csi_variables", "layer_macs"),
    "quadriga": ("UeScenario", "generate", "ue_scenarios"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
  if name not in _MODULE_OF:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)


def __dir__():
  return __all__
