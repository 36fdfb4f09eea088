#!/usr/bin/env bash
# The GPU checks benchmarks/RESULTS.md waits for, in one run of at most 9.6 minutes on an H100/H200:
# the CUDA cases of the tests; the input pipeline on the host's cores (every decode path, the
# device decoder with nvJPEG included); real pretraining epochs on the same JPEGs with the PIL
# workers and with the device decoder (does the pipeline keep up with the step?); and ViT-B/16
# steps at batch 256 in bf16, eager (pretraining and finetuning) and compiled (pretraining), side
# by side with ViTMAEForPreTraining. One log per check goes to $OUT (default gpu_checks/); a
# check that fails or runs out of time does not stop the others. The variables below shrink it
# for a dry run on a CPU:
#   DEVICE=cpu BATCH=2 IMAGES=8 WORKERS=2 MODEL=pretrain_mae_tiny_patch16_224 bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_checks}
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

train=(python3 benchmarks/bench_train.py --model "$model" --batch_size "$batch" --amp bf16 --device "$device"
       --warmup 5 --steps 20)
check env 30 python3 -c "import torch, torchvision, timm; print(torch.__version__, torchvision.__version__,
timm.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
check tests 45 python3 -m pytest -q tests -k cuda
check data 100 python3 benchmarks/bench_data.py --num_images "$images" --num_workers "$workers" --batch_size "$batch"
jpegs=$(mktemp -d)  # outside $OUT, whose files all travel back
runs=$(mktemp -d)  # not under $jpegs, where a run's pictures would become training images
trap 'rm -rf "$jpegs" "$runs"' EXIT
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_data, pathlib
bench_data.write_jpegs(pathlib.Path('$jpegs'), $images)"
for decoder in pil device; do
    check "epochs_$decoder" 60 python3 run_mae_pretraining.py --model "$model" --data_path "$jpegs" --decoder "$decoder" \
        --batch_size "$batch" --epochs 3 --num_workers "$workers" --device "$device" --print_freq 1000 \
        --output_dir "$runs/$decoder"
done
check train_eager 80 "${train[@]}"
check train_compiled 200 "${train[@]}" --compile --stages pretrain
