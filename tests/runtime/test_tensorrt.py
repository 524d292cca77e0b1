"""What can be checked of the TensorRT backend without TensorRT or a GPU: the refusal to run, the cache
key, the profile validation. Engine building itself runs on GPU machines (docs/RESULTS.md)."""

import sys

import pytest

from faircalib.cli import main
from faircalib.errors import ConfigError, FaircalibError
from faircalib.runtime.tensorrt import EngineConfig, cache_key, import_tensorrt


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError


def test_missing_tensorrt_says_what_to_install(no_tensorrt):
    with pytest.raises(FaircalibError, match=r"pip install 'faircalib\[gpu\]'"):
        import_tensorrt()


def test_build_engine_without_tensorrt_exits_non_zero(no_tensorrt, tmp_path, capsys):
    assert main(["build-engine", "--onnx", str(tmp_path), "--out", str(tmp_path / "engine")]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "Traceback" not in err


def test_generate_on_trt_without_tensorrt_is_a_clear_error(no_tensorrt, tmp_path, capsys):
    assert main(["generate", "--backend", "trt", "--onnx", str(tmp_path), "--prompt-ids", "1,2"]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


def test_cache_key_tracks_graph_profile_and_platform(tmp_path):
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"graph-a")
    base = cache_key(onnx_path, EngineConfig(), "10.8", "H100")
    assert base == cache_key(onnx_path, EngineConfig(), "10.8", "H100")
    assert base != cache_key(onnx_path, EngineConfig(max_seq=2048), "10.8", "H100")
    assert base != cache_key(onnx_path, EngineConfig(), "10.9", "H100")
    assert base != cache_key(onnx_path, EngineConfig(), "10.8", "Orin")
    onnx_path.write_bytes(b"graph-b")
    assert base != cache_key(onnx_path, EngineConfig(), "10.8", "H100")


def test_profile_validation():
    with pytest.raises(ConfigError, match="min_seq <= opt_seq <= max_seq"):
        EngineConfig(opt_seq=4096, max_seq=1024)
    with pytest.raises(ConfigError, match="opt_batch <= max_batch"):
        EngineConfig(opt_batch=16, max_batch=8)
