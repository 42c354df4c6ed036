#!/usr/bin/env bash
# One GPU acceptance run of segfocal, every step with its own time limit (8 minutes in all on one GPU):
#
#     benchmarks/gpu_acceptance.sh OUT_DIR          # on the GPU
#     benchmarks/gpu_acceptance.sh OUT_DIR --cpu    # the same steps, tiny, on the CPU (a test runs it)
#
# Steps: `segfocal check --json`; the kernel, fallback and check tests; the loss benchmark at the
# camvid, cityscapes and ade presets in bf16 and fp32; training throughput of a UNet ResNet-18 at
# 352x480, batch 8, bf16, channels_last, focal beside cross-entropy, without and with torch.compile;
# two epochs of the default recipe in fp16 and in bf16. Writes OUT_DIR/report.md (each step's
# status, time and command, then its output) and each step's log; exits 1 if any step failed.
set -uo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUT_DIR [--cpu]" >&2
    exit 2
fi
out=$1
cpu=${2:-}
if [[ -n "$cpu" && "$cpu" != "--cpu" ]]; then
    echo "usage: $0 OUT_DIR [--cpu]" >&2
    exit 2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
failed=0
steps="$out/steps.md"
: > "$steps"

step() {  # step NAME LIMIT_SECONDS COMMAND...: run COMMAND under `timeout`, log it, add its row
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local status=$?
    local took=$((SECONDS - started))
    local verdict="passed"
    if [[ $status -eq 124 ]]; then
        verdict="TIMED OUT after ${limit} s"
    elif [[ $status -ne 0 ]]; then
        verdict="FAILED (exit $status)"
    fi
    [[ $status -eq 0 ]] || failed=1
    echo "| $name | $verdict | $took s | \`$*\` |" >> "$steps"
}

if [[ -z "$cpu" ]]; then
    device=cuda
    step check 150 "$python" -m segfocal check --json "$out/check.json"
    step tests 180 "$python" -m pytest -q -p no:cacheprovider tests/test_focal_kernels.py tests/test_focal_fallback.py \
        tests/test_check.py
    for preset in camvid cityscapes ade; do
        for dtype in bf16 fp32; do
            step "loss_${preset}_${dtype}" 60 "$python" benchmarks/benchmark_loss.py --preset "$preset" --dtype "$dtype" \
                --no-memory --rounds 10 --only "segfocal fused" "segfocal reference" "F.cross_entropy weighted"
        done
    done
    train=(--batch 8 --size 352 480 --amp bf16 --layout channels_last --steps 10 --rounds 3)
    step train_throughput 90 "$python" benchmarks/benchmark_train.py "${train[@]}"
    step train_throughput_compiled 150 "$python" benchmarks/benchmark_train.py "${train[@]}" --compile
    amps=(fp16 bf16)
    recipe=(--set train.epochs=2)
else
    device=cpu
    step check 120 "$python" -m segfocal check --quick --no-timing --json "$out/check.json"
    step tests 120 "$python" -m pytest -q -p no:cacheprovider tests/test_focal_kernels.py -k "cuda_path or guard"
    step loss_camvid_fp32 60 "$python" benchmarks/benchmark_loss.py --preset camvid --batch 1 --size 32 32 --dtype fp32 \
        --no-memory --warmup 1 --rounds 1 --only "segfocal fused" "F.cross_entropy weighted"
    step train_throughput 90 "$python" benchmarks/benchmark_train.py --batch 1 --size 64 64 --amp fp32 --steps 1 \
        --rounds 1 --device cpu
    echo "| train_throughput_compiled | skipped on the CPU: Inductor compiles the model for minutes | - | - |" >> "$steps"
    amps=(fp32 bf16)  # float16 autocast is for GPUs
    recipe=(--set train.iters=2 --set train.val_every=2 --set train.save_every=2 --set data.num_workers=0
            --set "data.synthetic={num_train: 8, num_val: 4, num_test: 4, image_size: 32}"
            --set "model.kwargs={encoder_depth: 3, decoder_channels: [32, 16, 8]}")
fi
for amp in "${amps[@]}"; do
    step "train_default_${amp}" 120 "$python" tools/train.py --config configs/synthetic_unet_focal.yaml "${recipe[@]}" \
        --set "train.amp=$amp" --set "data.root=$out/data" --work-dir "$out/train_$amp" --no-progress
done

{
    echo "# segfocal GPU acceptance run ($device)"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname); $("$python" -c 'import torch; print("torch", torch.__version__, "/", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' 2>&1)"
    echo
    echo "| step | result | time | command |"
    echo "|---|---|---|---|"
    cat "$steps"
    for log in "$out"/*.log; do
        echo
        echo "## $(basename "$log" .log)"
        echo
        echo '```text'
        tail -n 40 "$log"
        echo '```'
    done
} > "$out/report.md"
rm -f "$steps"
echo "wrote $out/report.md"
exit $failed
