"""Compression: int8 quantization, pruning and distillation, each a checkpoint -> checkpoint transform."""
