"""The calibration benchmark: every method x format x calibration seed on one model."""

from faircalib.bench.report import flip_curve_svg, markdown_table, summarise
from faircalib.bench.run import BenchConfig, run_bench

__all__ = ["BenchConfig", "flip_curve_svg", "markdown_table", "run_bench", "summarise"]
