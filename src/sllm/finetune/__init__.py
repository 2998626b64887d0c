"""Fine-tuning a pre-trained run: sentence-similarity regression (STS)."""
