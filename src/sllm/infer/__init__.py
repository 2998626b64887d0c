"""Inference: sampling rules, the KV-cache generation engine, and the interfaces on top."""
