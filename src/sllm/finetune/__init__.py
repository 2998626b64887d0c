"""Fine-tuning a pre-trained run: sentence-similarity regression (STS) and instruction tuning (SFT)."""
