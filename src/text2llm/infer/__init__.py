"""Inference engines and decoding: the PyTorch engine with a KV cache (``generate``, ``fast_step``),
the ahead-of-time compiled step (``aot``), the ONNX Runtime engine (``ort_runtime``), the shared
sampling loop (``decoding``) and the OpenAI-compatible server (``server``). Which engine serves a
dir is decided once, in :mod:`text2llm.artifacts`."""
