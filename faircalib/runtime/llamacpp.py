"""llama.cpp as a backend: ``backend(input_ids [B, L]) -> logits [B, L, V]`` from a bundle's model.gguf, through
llama-cpp-python's low-level bindings (its high-level ``Llama`` assumes a KV cache these models do not have).

llama.cpp runs LLaDA and Dream without a cache and non-causally: every call is one full forward of every
sequence, all of whose logits it returns. Sequences of a batch go in as separate sequence ids, which llama.cpp
keeps apart with a block-diagonal mask. Flash attention stays off: on the CPU it would round Q, K and V to fp16.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import torch

from faircalib.errors import CheckpointError, ConfigError, FaircalibError

INSTALL_HINT = (
    'llama-cpp-python is not installed: `make install` builds it from source (CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=ON" '
    "pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36)"
)


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise FaircalibError(INSTALL_HINT) from None
    return llama_cpp


def _quiet(_level, _text, _user_data) -> None:
    pass


class LlamaCppBackend:
    """A bundle's model.gguf on llama.cpp (CPU). ``max_tokens``: the longest sequence it takes (llama.cpp sizes
    its buffers, logits included, for it); ``threads``: llama.cpp's threads (default: one per core this process
    may use)."""

    name = "llamacpp"

    def __init__(self, bundle: str | Path, *, threads: int = 0, max_tokens: int = 1024, verbose: bool = False):
        lib = import_llama_cpp()
        path = Path(bundle) / "model.gguf" if Path(bundle).is_dir() else Path(bundle)
        if not path.is_file():
            raise CheckpointError(f"no model.gguf at {bundle}: export one with --profile gguf-q4_0 (or q8_0, f16)")
        self._lib, self.max_tokens = lib, max_tokens
        if not verbose:
            self._log = lib.llama_log_callback(_quiet)  # kept: llama.cpp holds the pointer
            lib.llama_log_set(self._log, ctypes.c_void_p())
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise CheckpointError(f"llama.cpp could not load {path}")
        if not lib.llama_model_is_diffusion(self.model):
            raise ConfigError(f"{path} is not a diffusion model for llama.cpp")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.ctx = lib.llama_init_from_model(self.model, self._context_params(threads))
        if not self.ctx:
            raise FaircalibError(f"llama.cpp could not make a context for {path}")
        self.batch = lib.llama_batch_init(max_tokens, 0, 1)

    def _context_params(self, threads: int):
        lib, params = self._lib, self._lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = self.max_tokens  # one call is one llama.cpp ubatch
        params.n_seq_max = 1
        params.embeddings = False
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.n_threads = params.n_threads_batch = threads or len(os.sched_getaffinity(0))
        return params

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.detach().cpu().numpy().astype(np.int32)
        if ids.shape[1] > self.max_tokens:
            raise ConfigError(f"a sequence of {ids.shape[1]} tokens is longer than this backend's {self.max_tokens}")
        # one sequence a call: llama.cpp attends over every token of a call, masking the other sequences out, so
        # a batch in one call costs more than its sequences one by one
        return torch.from_numpy(np.stack([self._forward(row) for row in ids]))

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        """One llama.cpp call over one sequence ``ids`` [L]: logits [L, V] float32."""
        lib, batch, length = self._lib, self.batch, ids.shape[0]
        for name, values in (("token", ids), ("pos", np.arange(length)), ("n_seq_id", 1), ("logits", 1)):
            np.ctypeslib.as_array(getattr(batch, name), shape=(self.max_tokens,))[:length] = values
        for k in range(length):
            batch.seq_id[k][0] = 0
        batch.n_tokens = length
        if lib.llama_decode(self.ctx, batch) != 0:
            raise FaircalibError("llama.cpp failed to run the batch")
        return np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), shape=(length, self.n_vocab)).copy()

    def __del__(self):
        lib = getattr(self, "_lib", None)
        if lib is not None and getattr(self, "ctx", None):
            lib.llama_batch_free(self.batch)
            lib.llama_free(self.ctx)
            lib.llama_model_free(self.model)
            self.ctx = None


def diffusion_cli() -> tuple[Path, dict[str, str]]:
    """llama.cpp's own ``llama-diffusion-cli``, built with the bindings from the same source, and the environment
    it runs in (its libraries lie beside it in the install)."""
    site = Path(import_llama_cpp().__file__).parents[1]
    binary = site / "bin" / "llama-diffusion-cli"
    if not binary.is_file():
        raise FaircalibError(f"no llama-diffusion-cli at {binary}: {INSTALL_HINT}")
    libraries = os.pathsep.join(filter(None, [str(site / "lib"), os.environ.get("LD_LIBRARY_PATH")]))
    return binary, {**os.environ, "LD_LIBRARY_PATH": libraries}
