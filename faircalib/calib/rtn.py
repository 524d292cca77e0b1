"""Round to nearest: each weight's own grid point, the baseline every solver is measured against."""

from __future__ import annotations

import torch

from faircalib.calib.linear import QuantizedWeight
from faircalib.calib.quant import WeightSpec, quantize_weight, weight_qparams


def rtn_weight(weight: torch.Tensor, spec: WeightSpec) -> QuantizedWeight:
    """Codes, scales (and zero points) of ``weight`` [N, K] rounded to nearest on its own min/max grid."""
    scale, zero = weight_qparams(weight.float(), spec)
    return QuantizedWeight(quantize_weight(weight.float(), scale, zero, spec), scale, zero, spec)
