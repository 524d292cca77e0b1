import os

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels run on the interpreter; read when they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from faircalib.models.tiny import write_tiny_checkpoint  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One random checkpoint per family, written once in the real on-disk layout."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: write_tiny_checkpoint(family, root / family, seed=1) for family in ("llada", "dream", "bert")}
