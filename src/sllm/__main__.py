"""`python -m sllm` is the `sllm` command (torchrun launches it this way)."""

from sllm.cli import main

if __name__ == "__main__":
    main()
