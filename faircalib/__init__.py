"""faircalib: frontier-aware low-bit calibration, export and edge runtime for diffusion LMs.

The public API (docs/DESIGN.md): ``load_denoiser``, ``preset`` / ``QuantConfig``, ``quantize`` ->
``QuantArtifact`` (``save`` / ``load`` / ``apply``), ``export``, ``parity``, and the samplers' settings
``LLaDASampling`` / ``DreamSampling`` with ``generate``. Names load on first use, so ``import faircalib`` (and
the command line) stay fast.
"""

from __future__ import annotations

import importlib

from faircalib.errors import FaircalibError

__version__ = "0.1.0"

_EXPORTS = {
    "load_denoiser": "faircalib.models",
    "load_tokenizer": "faircalib.models",
    "preset": "faircalib.calib.config",
    "QuantConfig": "faircalib.calib.config",
    "QuantArtifact": "faircalib.calib.artifact",
    "quantize": "faircalib.api",
    "calibrate_to": "faircalib.api",
    "export": "faircalib.api",
    "parity": "faircalib.api",
    "LLaDASampling": "faircalib.sampling",
    "DreamSampling": "faircalib.sampling",
    "generate": "faircalib.sampling",
}
__all__ = ["FaircalibError", "__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'faircalib' has no attribute {name!r}")
