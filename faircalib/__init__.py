"""faircalib: frontier-aware low-bit calibration, export and edge runtime for diffusion LMs."""

from faircalib.errors import FaircalibError

__version__ = "0.1.0"
__all__ = ["FaircalibError", "__version__"]
