"""CSI feedback: data, models and metrics of the field (CsiNet, CRNet, COST2100).

* :mod:`~picpq_jax.csi.mat`: CsiNet's COST2100 ``.mat`` files (``HT`` ->
  ``[N, 32, 32, 2]``, ``HF_all`` -> ``[N, 32, 125]``), v5 and v7.3.
* :mod:`~picpq_jax.csi.quadriga`: the same kind of data from quadriga-lib's IEEE TGn
  indoor models, one scenario per UE, cached.
* :mod:`~picpq_jax.csi.models`: CsiNet and CRNet as encoder (UE) and decoder (BTS)
  modules; decoders split into consecutive stages for a pipelined BTS.
* :mod:`~picpq_jax.csi.metrics`: NMSE (dB) and rho exactly as CsiNet's reference
  evaluation computes them.
* :mod:`~picpq_jax.csi.methods`: centralized, FedAvg, split (own UE encoders, one
  BTS decoder) and split with the BTS decoder pipelined (:mod:`~picpq_jax.csi.pipeline`,
  GPipe over a ``stages`` mesh axis), each a step program compiled once.
* :mod:`~picpq_jax.csi.traffic`: exact bytes per UE and round, and a round-time model.
* :mod:`~picpq_jax.csi.edge`: PIC-PQ on the UE side: a trained encoder quantized with
  LSQ (post-training, optional short fine-tune through the frozen decoder) and its
  FLOPs, parameters, BOPs and bytes from the library's cost model.
* :mod:`~picpq_jax.csi.run`: ``picpq csi`` on the run engine (options in
  :mod:`~picpq_jax.csi.config`).

What was chosen where the papers and reference code are silent:

1. Layout: NHWC ``[32 angle, 32 delay, 2 (re, im)]``, the reference's channels-first
   ``[2, 32, 32]`` transposed (``HT.reshape(N, 2, 32, 32).transpose(0, 2, 3, 1)``).
2. Scaling of generated data: per sample, ``0.5 + H / (2 max(|Re H|, |Im H|))``
   (COST2100's own scale is unpublished; ``normalize="dataset"`` uses one maximum
   for all samples). NMSE and rho subtract 0.5 first, as the reference.
3. Angular-delay transform of generated data: orthonormal DFT over antennas,
   orthonormal inverse DFT over the 1024 subcarriers (paths land at tap
   ``tau * bandwidth``), first 32 taps kept (>90 % of the energy for TGn B-F).
4. Channel model: quadriga-lib ``get_ieee_indoor`` (TGn B-F at 5.25 GHz), 32-element
   half-wavelength ULA of omni elements at the BTS, one omni UE antenna, 20 MHz over
   1024 subcarriers. Each UE: its own TGn model, distance (3-30 m) and direction
   (-60..60 degrees); its samples jitter position by +-10 % / +-5 degrees.
5. ``HF`` for rho on generated data: the FFT (257 points, first 125 bins) of the
   truncated angular-delay matrix, i.e. what the reference applies to a
   reconstruction; rho = 1 for a perfect reconstruction.
6. Models: the library's initializers (not Keras' Glorot / CRNet's Xavier), CsiNet's
   convs with bias (Keras default) and CRNet's without (as its ``ConvBN``), BN with
   PyTorch's momentum, NHWC flatten order before the dense layers. A quiet start
   (``init_csi_variables``), so the untrained model outputs about 0.5 (the CSI's
   mean) and short runs learn the CSI instead of first shrinking a unit-scale
   output: CsiNet's last conv at 0.01 x its drawn kernel; CRNet, whose sigmoid reads
   the residual stream, its head's BN scale x0.1 with shift +0.3 (the stream in
   LeakyReLU's linear part), each CRBlock's last BN scale 0 (zero-init residual) and
   crblock2's last BN shift -0.3. As drawn, CRNet collapsed to a constant output
   (0 dB), measured.
7. Decoder stages: the pieces ``fc`` + blocks (CsiNet: fc, refine1, refine2, out;
   CRNet: fc, head, crblock1, crblock2); ``decoder_stages(decoder, S, M)`` gives ``S``
   consecutive spans whose costliest stage (counted MACs, ``piece_macs``) costs least:
   GPipe runs at the pace of its slowest stage.
8. Training (the split paper is silent): MSE loss on [0, 1] and Adam (CsiNet's) at
   a constant rate by default (CsiNet's reference, and CRNet's ``--scheduler const``);
   ``--schedule cosine`` is CRNet's other recipe (``WarmUpCosineAnnealingLR``: linear
   warm-up, then cosine to ``eta_min``; its reference: peak 2e-3, 30 of 2500 epochs
   of warm-up, ``eta_min`` 5e-5), over all ``rounds x local_steps`` steps;
   the loss is taken at the BTS, so in the split methods a UE uploads the CSI its
   codewords encode as the training target (as split learning uploads labels),
   optionally quantized (``--target-bits``), and counted. Encoders are never
   averaged unless ``--encoder-sync N`` (FedAvg of the encoders every N rounds).
   FedAvg's UEs start each round with a fresh Adam state (not sent).
9. The pipeline's micro-batches are the UEs' batches; batch norm at the BTS
   normalizes each micro-batch on its own (as GPipe), in the split method too, so
   the two are equal and one UE's split step is the centralized step.

The public names below load their module on first use (PEP 562), so that the
generator's worker processes, which import :mod:`picpq_jax.csi.quadriga`, do not
pay for importing JAX and Flax.
"""

import importlib

_EXPORTS = {
    "domain": ("angular_delay", "frequency_response", "to_complex", "to_unit_range"),
    "edge": ("encoder_cost", "encoder_quant", "finetune_encoder", "quantize_encoder",
             "quantized_encoder"),
    "mat": ("COST2100_SCENARIOS", "cost2100_paths", "load_cost2100", "load_hf", "load_ht",
            "read_mat"),
    "metrics": ("nmse_db", "nmse_per_sample", "rho", "rho_per_sample", "to_db"),
    "models": ("ARCHITECTURES", "COMPRESSION_RATIOS", "CRBlock", "CRNetDecoder",
               "CRNetEncoder", "CsiAutoencoder", "CsiNetDecoder", "CsiNetEncoder",
               "RefineNet", "codeword_size", "decoder_stages", "get_csi_model", "piece_macs",
               "stage_variables", "init_csi_variables", "layer_macs"),
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
