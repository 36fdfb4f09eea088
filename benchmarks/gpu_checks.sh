#!/usr/bin/env bash
# The GPU checks, on an H100/H200, in calls that each fit a 10-minute device call: parts 1 and 2
# take at most 12 minutes together (each check's limit below plus about 10 s of start-up: 6 and
# 6 minutes), part 3 is for the next GPU (10 minutes). Each check writes $OUT/NAME.log (default
# gpu_checks/) and one line here; a check that fails or runs out of time does not stop the others.
# benchmarks/RESULTS.md, "GPU checks", says which table each one fills.
#   PART=1 bash benchmarks/gpu_checks.sh   # at most 6 minutes: what users run on a GPU, never checked on one
#     env, tests: the versions, and the CUDA cases of the tests;
#     fsdp_bf16: --fsdp pretraining in bf16 on one GPU (NCCL, world size 1): a few steps, finite
#       losses, the sharded checkpoint written, then resumed by a relaunch that evaluates the encoder
#       (k-NN and the sweep probe on 256 synthetic images a split);
#     sigterm: SIGTERM mid-epoch on CUDA, exit 143, and the relaunch continuing from the step;
#     max_batch_large, max_batch_huge: with --fsdp --grad_checkpointing in bf16 at 224 px, the largest
#       batch one GPU holds for ViT-L/16 and ViT-H/14 (doubling, then bisection on out-of-memory),
#       and images/s and peak memory at that batch.
#   PART=2 bash benchmarks/gpu_checks.sh   # at most 6 minutes
#     max_batch_giant, max_batch_2b: the same for ViT-g/14 and ViT-2B/14;
#     compiled_plain, compiled_fsdp: the compiled pretraining step of ViT-B/16 unsharded and sharded
#       (torchrun, one process), side by side.
#   PART=3 bash benchmarks/gpu_checks.sh   # at most 10 minutes, the next GPU's: the older checks
#     data: the pretraining input pipeline on the host's cores, every decode path, and the device
#       decoder's share with nvJPEG; epochs_pil, epochs_device: three real pretraining epochs on the
#       same JPEGs with PIL workers and with the device decoder; train_eager, train_compiled: ViT-B/16
#       steps at batch 256 in bf16 beside ViTMAEForPreTraining, profiled; data_finetune: finetuning's
#       pipeline (RandAugment on PIL) through 16 workers.
# Without PART all three run, one after the other. The CPU dry run, to run by hand after changing a
# script the checks call (AMP=none where the CPU has no bf16 units: emulated bf16 takes minutes a step):
#   OUT=/tmp/gc DEVICE=cpu AMP=bf16 BATCH=2 IMAGES=8 WORKERS=1 INPUT_SIZE=32 WARMUP=1 STEPS=2 \
#     MODEL=pretrain_mae_tiny_patch16_224 BIG_MODELS=pretrain_mae_tiny_patch16_224 MAX_BATCH=4 \
#     bash benchmarks/gpu_checks.sh
# On a CPU the compiled checks run uncompiled (compiling takes minutes there), the tests check only
# collects the CUDA cases, and the one-GPU checks run without torchrun (a process alone makes the same
# process group of one; torchrun's own start-up is most of a dry-run check's time).
# PLAN=1 runs nothing: it writes every Python command each check would start to $OUT/plan.txt (fields
# ended by 0x1f, commands by 0x1e), and takes each check's own verdicts as passed; tests/test_gpu_checks.py
# hands each planned command, GPU and dry-run settings alike, to its script's own parser on every CI run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_checks}
part=${PART:-all}
device=${DEVICE:-cuda}
amp=${AMP:-bf16}
batch=${BATCH:-256}
images=${IMAGES:-2000}
workers=${WORKERS:-16}
model=${MODEL:-pretrain_mae_base_patch16_224}
max_batch=${MAX_BATCH:-65536}
size=${INPUT_SIZE:-224}
warmup=${WARMUP:-5}
steps=${STEPS:-20}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
planning=${PLAN:+1}
if [ -n "$planning" ]; then  # record each Python command a check starts, with the check's name; run none
    plan=$out/plan.txt
    : >"$plan"
    python3() {
        printf '%s\x1f' "$CHECK" "$@" >>"$plan"
        printf '\x1e' >>"$plan"
    }
    export -f python3
    export plan
fi
verify() {  # verify COMMAND...: a check's test of what its run left behind; passed in the plan, which ran nothing
    [ -n "$planning" ] || "$@"
}
compile=(--compile)
if [ "$device" = cpu ]; then compile=(); fi
big() {  # big NAME: the model to search, or the dry run's stand-in
    echo "${BIG_MODELS:-$1}"
}

check() {  # check NAME SECONDS COMMAND...: run COMMAND with a time limit, its output to $out/NAME.log
    local name=$1 seconds=$2
    shift 2
    export CHECK=$name
    echo "== $name ($(date -u +%H:%M:%S), at most ${seconds}s): $*"
    if [ -n "$planning" ]; then  # timeout would start the real python3, not the recording function
        "$@" >"$out/$name.log" 2>&1
    else
        timeout "$seconds" "$@" >"$out/$name.log" 2>&1
    fi
    echo "   exit $?; last line: $(tail -n 1 "$out/$name.log" | cut -c 1-400)"
}

one_gpu() {  # one_gpu SCRIPT ARGS...: under torchrun with one process, so NCCL runs with world size 1
    if [ "$device" = cpu ]; then  # the dry run: a process alone makes the same group of one, without torchrun
        python3 "$@"
    else
        python3 -m torch.distributed.run --standalone --nproc_per_node 1 "$@"
    fi
}

pretrain_args() {  # pretrain_args DIR EPOCHS: a short synthetic pretraining that saves every 5 steps
    echo --model "$model" --input_size "$size" --num_samples $((batch * 10)) --batch_size "$batch" --epochs "$2" \
        --device "$device" --amp "$amp" --num_workers "$workers" --print_freq 1 --save_ckpt_steps 5 --output_dir "$1"
}

fsdp_bf16() {  # two epochs of --fsdp pretraining, the second from the first's sharded checkpoint and evaluated
    local dir
    dir=$(mktemp -d)
    # shellcheck disable=SC2046
    one_gpu run_mae_pretraining.py $(pretrain_args "$dir" 1) --fsdp || return 1
    verify test -f "$dir/checkpoint-0/meta.json" || { echo "no sharded checkpoint"; return 1; }
    # shellcheck disable=SC2046
    one_gpu run_mae_pretraining.py $(pretrain_args "$dir" 2) --fsdp --eval_data_set synthetic --eval_num_samples 256 \
        | tee "$dir/second.log" || return 1
    verify grep -q "resumed from .*checkpoint-last at epoch 1" "$dir/second.log" || { echo "did not resume"; return 1; }
    python3 -c "import json, math, sys; lines = [json.loads(l) for l in open(sys.argv[1])]
losses = [line['train_loss'] for line in lines]; evaluated = lines[-1].get('knn_acc1'), lines[-1].get('probe_acc1')
print('losses', losses, 'evaluation', evaluated)
sys.exit(not (len(losses) == 2 and all(map(math.isfinite, losses)) and None not in evaluated))" "$dir/log.txt"
    local code=$?
    rm -rf "$dir"
    return $code
}

sigterm() {  # SIGTERM once step 5 of the first epoch is printed: exit 143, then the relaunch continues from that step
    local dir line
    dir=$(mktemp -d)
    # shellcheck disable=SC2046
    python3 run_mae_pretraining.py $(pretrain_args "$dir" 2) >"$dir/first.log" 2>&1 &
    local pid=$!
    while IFS= read -r line; do  # line by line as written: a poll could miss a fast device's first epoch
        [[ $line == "epoch 0 [5/"* ]] && break
    done < <(tail -s 0.05 -f --pid "$pid" "$dir/first.log")
    verify kill -TERM "$pid"
    wait "$pid"
    local code=$?
    cat "$dir/first.log"
    echo "first run: exit $code"
    verify [ "$code" -eq 143 ] || return 1
    # shellcheck disable=SC2046
    python3 run_mae_pretraining.py $(pretrain_args "$dir" 2) | tee "$dir/second.log" || return 1
    verify grep -q "resumed from .* at epoch 0 step" "$dir/second.log" || { echo "did not continue from the step"; return 1; }
    rm -rf "$dir"
}

max_batch() {  # max_batch MODEL: the largest --fsdp --grad_checkpointing batch one device holds
    one_gpu benchmarks/bench_max_batch.py --models "$1" --device "$device" --amp "$amp" --fsdp \
        --grad_checkpointing --max_batch "$max_batch" --input_size "$size"
}
export -f one_gpu pretrain_args fsdp_bf16 sigterm max_batch big verify
export model batch device amp workers max_batch size planning

part_1() {
    check env 15 python3 -c "import torch, torchvision, timm; print(torch.__version__, torchvision.__version__,
timm.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    check tests 45 python3 -m pytest -q tests -k cuda
    check fsdp_bf16 60 bash -c fsdp_bf16
    check sigterm 50 bash -c sigterm
    check max_batch_large 60 bash -c "max_batch $(big pretrain_mae_large_patch16_224)"
    check max_batch_huge 70 bash -c "max_batch $(big pretrain_mae_huge_patch14_224)"
}

part_2() {
    check max_batch_giant 85 bash -c "max_batch $(big pretrain_mae_giant_patch14_224)"
    check max_batch_2b 100 bash -c "max_batch $(big pretrain_mae_2b_patch14_224)"
    local train=(benchmarks/bench_train.py --model "$model" --input_size "$size" --batch_size "$batch" --amp "$amp"
                 --device "$device" --stages pretrain --no-vitmae --warmup "$warmup" --steps "$steps" "${compile[@]}")
    check compiled_plain 65 bash -c 'one_gpu "$@"' _ "${train[@]}"
    check compiled_fsdp 65 bash -c 'one_gpu "$@"' _ "${train[@]}" --fsdp
}

part_3() {
    check data 90 python3 benchmarks/bench_data.py --num_images "$images" --num_workers "$workers" \
        --batch_size "$batch" --input_size "$size"
    local jpegs runs
    jpegs=$(mktemp -d)  # outside $OUT, whose files all travel back
    runs=$(mktemp -d)  # not under $jpegs, where a run's pictures would become training images
    python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_data, pathlib
bench_data.write_jpegs(pathlib.Path('$jpegs'), $images)"
    local epochs=(python3 run_mae_pretraining.py --model "$model" --input_size "$size" --data_path "$jpegs"
                  --batch_size "$batch" --epochs 3 --num_workers "$workers" --device "$device" --amp "$amp"
                  --print_freq 1000)
    check epochs_pil 55 "${epochs[@]}" --decoder pil --output_dir "$runs/pil"
    check epochs_device 55 "${epochs[@]}" --decoder device --output_dir "$runs/device"
    rm -rf "$jpegs" "$runs"
    local train=(python3 benchmarks/bench_train.py --model "$model" --input_size "$size" --batch_size "$batch"
                 --amp "$amp" --device "$device" --warmup "$warmup" --steps "$steps" --profile 25)
    check train_eager 75 "${train[@]}"
    check train_compiled 190 "${train[@]}" "${compile[@]}" --stages pretrain
    check data_finetune 65 python3 benchmarks/bench_data.py --stage finetune --num_images "$images" \
        --num_workers "$workers" --batch_size "$batch" --input_size "$size"
}

case $part in
    1) part_1 ;;
    2) part_2 ;;
    3) part_3 ;;
    all) part_1; part_2; part_3 ;;
    *) echo "PART must be 1, 2, 3 or unset, not '$part'" >&2; exit 2 ;;
esac
