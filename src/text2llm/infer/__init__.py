"""Inference: KV-cache sampling (generate.py), ONNX export + runtime (onnx.py), Hugging Face interop (hf.py)."""
