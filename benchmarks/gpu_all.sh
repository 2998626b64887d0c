#!/usr/bin/env bash
# Every GPU measurement docs/benchmarks.md asks for, for a machine with CUDA and torch +
# transformers installed (no network needed: it runs from the checkout, not installed). Each
# table also goes to $OUT (or ./gpu-results). Name stages to split the work across calls:
# the training stages compile several models, minutes each, so on a short device budget run
# them in this order, one call each, and stop where the budget ends.
#
#     OUT=/tmp/gpu bash benchmarks/gpu_all.sh gpu-tests generate   # first call
#     OUT=/tmp/gpu bash benchmarks/gpu_all.sh train-124m           # second
#     OUT=/tmp/gpu bash benchmarks/gpu_all.sh train-350m           # third
#
# Warnings stay in the output: the engine warns when a CUDA graph falls back to eager steps,
# which would make the graph rows measure the plain step.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src"
out="${OUT:-gpu-results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/machine.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" |
    tee -a "$out/machine.txt"
git log -1 --format='commit %h %cd' | tee -a "$out/machine.txt"

run() {  # run NAME COMMAND...: the command's output to the terminal and to $out/NAME.txt
    local name=$1
    shift
    echo "== $name: $*"
    PYTHONUNBUFFERED=1 "$@" 2>&1 | tee "$out/$name.txt"
}

for stage in "${@:-gpu-tests generate train-124m train-350m}"; do
    for name in $stage; do
        case $name in
            # test modules whose optional packages (fastapi, selenium, ...) are missing there
            # fail to collect; the GPU tests in the others still run
            gpu-tests) run gpu-tests python3 -m pytest -q -m gpu --continue-on-collection-errors tests ;;
            generate) run generate python3 benchmarks/generate_speed.py --device cuda --shape gpt2-124m \
                --new-tokens 256 --batch-sizes 1 32 --repeats 5 ;;
            train-124m) run train-124m python3 benchmarks/train_throughput.py --device cuda --shape gpt2-124m \
                --batch 16 --steps 10 --rounds 3 --checkpointing --auto-batch ;;
            train-350m) run train-350m python3 benchmarks/train_throughput.py --device cuda --shape ko-350m \
                --batch 8 --steps 5 --rounds 2 --checkpointing ;;
            *) echo "unknown stage $name (gpu-tests, generate, train-124m, train-350m)" >&2 && exit 2 ;;
        esac
    done
done
