"""Inference: the decoder and its KV cache, generation, chat, the HTTP server and speed benchmarks."""
