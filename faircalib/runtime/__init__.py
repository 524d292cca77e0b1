"""Backends that run one denoiser forward (torch, ONNX Runtime, TensorRT) and the unmasking driver."""
