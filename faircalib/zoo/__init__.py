"""The project's own small trained models (the default for `make demo` and the benchmarks)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "llada-wiki-tiny"


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Directory of a bundled model (a real LLaDA checkpoint layout)."""
    return Path(__file__).parent / name
