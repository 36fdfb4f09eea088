#!/usr/bin/env bash
# The GPU checks benchmarks/RESULTS.md waits for, on an H100/H200, in two calls that each fit in a
# 10-minute limit (the machine stays warm between them if the second follows at once):
#   PART=1 bash benchmarks/gpu_checks.sh   # at most 5.5 minutes
#     env, tests: the versions, and the CUDA cases of the tests;
#     data: the pretraining input pipeline on the host's cores, every decode path, and the device
#       decoder's share with nvJPEG (and how fast the host alone gets through it);
#     epochs_pil, epochs_device: three real pretraining epochs on the same JPEGs with PIL workers
#       and with the device decoder: does the pipeline keep up with the step?
#   PART=2 bash benchmarks/gpu_checks.sh   # at most 6.5 minutes
#     train_eager, train_compiled: ViT-B/16 steps at batch 256 in bf16, eager (pretraining and
#       finetuning) and compiled (pretraining), side by side with ViTMAEForPreTraining, each stage
#       then profiled (its 25 costliest operators: kernel time on the GPU, launch time on the host);
#     data_finetune: finetuning's pipeline (RandAugment on PIL) through 16 workers.
# Without PART both run, one after the other. One log per check goes to $OUT (default
# gpu_checks/); a check that fails or runs out of time does not stop the others. The variables
# below shrink it for a dry run on a CPU:
#   DEVICE=cpu BATCH=2 IMAGES=8 WORKERS=2 MODEL=pretrain_mae_tiny_patch16_224 bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_checks}
part=${PART:-all}
device=${DEVICE:-cuda}
batch=${BATCH:-256}
images=${IMAGES:-2000}
workers=${WORKERS:-16}
model=${MODEL:-pretrain_mae_base_patch16_224}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

check() {  # check NAME SECONDS COMMAND...: run COMMAND with a time limit, its output to $out/NAME.log
    local name=$1 seconds=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S), at most ${seconds}s): $*"
    timeout "$seconds" "$@" >"$out/$name.log" 2>&1
    echo "   exit $?; last line: $(tail -n 1 "$out/$name.log" | cut -c 1-400)"
}

part_1() {
    check env 20 python3 -c "import torch, torchvision, timm; print(torch.__version__, torchvision.__version__,
timm.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    check tests 45 python3 -m pytest -q tests -k cuda
    check data 100 python3 benchmarks/bench_data.py --num_images "$images" --num_workers "$workers" \
        --batch_size "$batch"
    local jpegs runs
    jpegs=$(mktemp -d)  # outside $OUT, whose files all travel back
    runs=$(mktemp -d)  # not under $jpegs, where a run's pictures would become training images
    python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_data, pathlib
bench_data.write_jpegs(pathlib.Path('$jpegs'), $images)"
    for decoder in pil device; do
        check "epochs_$decoder" 60 python3 run_mae_pretraining.py --model "$model" --data_path "$jpegs" \
            --decoder "$decoder" --batch_size "$batch" --epochs 3 --num_workers "$workers" --device "$device" \
            --print_freq 1000 --output_dir "$runs/$decoder"
    done
    rm -rf "$jpegs" "$runs"
}

part_2() {
    local train=(python3 benchmarks/bench_train.py --model "$model" --batch_size "$batch" --amp bf16
                 --device "$device" --warmup 5 --steps 20 --profile 25)
    check train_eager 80 "${train[@]}"
    check train_compiled 240 "${train[@]}" --compile --stages pretrain
    check data_finetune 70 python3 benchmarks/bench_data.py --stage finetune --num_images "$images" \
        --num_workers "$workers" --batch_size "$batch"
}

case $part in
    1) part_1 ;;
    2) part_2 ;;
    all) part_1; part_2 ;;
    *) echo "PART must be 1, 2 or unset, not '$part'" >&2; exit 2 ;;
esac
