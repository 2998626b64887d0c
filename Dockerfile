# sllm on a CUDA machine: docker build -t sllm . && docker run --gpus all -v $PWD:/work sllm demo
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /opt/sllm
COPY pyproject.toml README.md ./
COPY src ./src
# The extras README's tour uses: TensorBoard, report plots, HF export checks, serving, downloads.
RUN pip install --no-cache-dir ".[tensorboard,report,hf,serve,data]"
WORKDIR /work
ENTRYPOINT ["sllm"]
CMD ["--help"]
