"""Interop with other tools' formats: Hugging Face transformers dirs (``hf``: export and import),
ONNX (``onnx``: the export; running it is :mod:`text2llm.infer.ort_runtime`), GGUF for llama.cpp
and Ollama (``gguf``: the export) and lm-evaluation-harness (``lm_eval``: the model behind the
harness's ``LM`` interface)."""
