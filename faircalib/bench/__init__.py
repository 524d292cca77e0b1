"""The calibration benchmark: every method x format x calibration seed on one model."""

from faircalib.bench.page import bench_page, parity_page
from faircalib.bench.report import markdown_table, summarise
from faircalib.bench.run import BenchConfig, run_bench

__all__ = ["BenchConfig", "bench_page", "markdown_table", "parity_page", "run_bench", "summarise"]
