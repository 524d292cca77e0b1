"""The README's Python example, run as written: the public API in memory, disk optional."""

import re
from pathlib import Path

import pytest
import torch

import faircalib

README = Path(__file__).parents[1] / "README.md"


@pytest.mark.slow
def test_the_readme_python_example_runs_as_shown(tmp_path, monkeypatch):
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it writes runs/...; the bundled model's path is made absolute
    bundled = str(faircalib.__path__[0] + "/zoo/llada-wiki-tiny")
    namespace = {}
    exec(example.replace('"faircalib/zoo/llada-wiki-tiny"', repr(bundled)), namespace)  # noqa: S102
    report, artifact = namespace["report"], namespace["artifact"]
    assert 0 <= report["frontier_flip_rate"] <= 1 and report["prompts"] == 1
    again = faircalib.QuantArtifact.load(tmp_path / "runs" / "api-fair-w4a4")
    assert again.layers.keys() == artifact.layers.keys()
    assert all(torch.equal(again.layers[k].weight.codes, v.weight.codes) for k, v in artifact.layers.items())
    assert (tmp_path / "runs" / "api-bundle" / "model.onnx").is_file()
    # quantize left the teacher as it was: it still decodes exactly like a freshly loaded one
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(namespace["model"](ids), faircalib.load_denoiser(bundled)(ids))


def test_the_public_api_names_resolve():
    for name in faircalib.__all__:
        assert getattr(faircalib, name) is not None
    with pytest.raises(AttributeError):
        faircalib.no_such_name  # noqa: B018


def test_a_preset_is_the_config_of_its_method_and_format():
    assert faircalib.QuantConfig(method="fair", abits=4) == faircalib.preset("fair", abits=4)
    assert faircalib.QuantConfig.from_json_dict(faircalib.preset("quarot").to_json_dict()) == faircalib.preset("quarot")


@pytest.mark.parametrize("script", ["gpu_scale.py", "llamacpp.py"])
def test_the_benchmark_scripts_import(script):
    """They run where CI cannot (a GPU, an hour of CPU); their imports must still follow the package."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / script
    spec = importlib.util.spec_from_file_location(path.stem, path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
