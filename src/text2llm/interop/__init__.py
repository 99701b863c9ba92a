"""Interop with other tools' formats: Hugging Face transformers dirs (``hf``: export and import) and
ONNX (``onnx``: the export; running it is :mod:`text2llm.infer.ort_runtime`)."""
