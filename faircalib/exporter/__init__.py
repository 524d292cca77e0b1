"""Model + artifact -> QDQ ONNX of one denoiser forward, schedule.json, and static checks of the result."""
