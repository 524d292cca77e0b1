import pytest
import torch

from faircalib.models.tiny import write_tiny_checkpoint


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One random checkpoint per family, written once in the real on-disk layout."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: write_tiny_checkpoint(family, root / family, seed=1) for family in ("llada", "dream", "bert")}
