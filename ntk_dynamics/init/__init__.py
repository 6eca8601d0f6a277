"""NTK-based initialization: the kernel's spectrum at init and tweaks judged by training.

Spectrum: `ntk_spectrum` (eigh or matrix-free Lanczos), `kernel_spectrum`, `layer_shares`.
Tweaks (pure functions returning a `TweakResult`): `spectral_learning_rate`,
`center_outputs`, `balance_layers`, `search_init_scales`.
"""
from ntk_dynamics.init.search import default_scalable, search_init_scales
from ntk_dynamics.init.spectrum import (NtkSpectrum, kernel_spectrum, layer_shares,
                                        layer_traces, ntk_spectrum, shares_from_traces)
from ntk_dynamics.init.tweaks import (TweakResult, balance_layers, center_outputs,
                                      effective_model, learning_rate_regime,
                                      scale_by_multipliers, spectral_learning_rate)

__all__ = ["NtkSpectrum", "TweakResult", "balance_layers", "center_outputs", "default_scalable",
           "effective_model", "kernel_spectrum", "layer_shares", "layer_traces",
           "learning_rate_regime", "ntk_spectrum", "scale_by_multipliers",
           "search_init_scales", "shares_from_traces", "spectral_learning_rate"]
