#!/usr/bin/env bash
# Every GPU measurement docs/benchmarks.md is waiting for, in one call of a few minutes.
#
# Each step runs under its own time limit and writes its table to $OUT/<step>.txt; a step that fails
# or runs out of time is recorded in $OUT/status.txt and the next one still runs. Nothing here
# decides a default: read the tables, then change defaults in a separate, reviewed commit.
#
# Usage (repository root, s3d importable: `pip install -e .`, or PYTHONPATH=. with the runtime
# dependencies present):
#   OUT=gpu_results bash benchmarks/gpu_session.sh            # on the GPU machine, under 10 minutes
#   OUT=/tmp/g DEVICE=cpu QUICK=1 bash benchmarks/gpu_session.sh   # dry run of the script itself
#
# Budget (seconds, upper limits, not measurements): tests 90, forward 60, pretrain_step 90,
# pretrain_compile 75, sparse_engine 60, predict 45, dataloader 30, finetune 60, demo 70 => at most 580 s,
# inside one 600 s device call.
set -u
OUT="${OUT:-gpu_results}"
DEVICE="${DEVICE:-cuda}"
QUICK="${QUICK:-0}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
: > "$OUT/status.txt"

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, keep its output, record rc and seconds
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/status.txt"
    tail -n 25 "$OUT/$name.txt"
}

{
    date -u
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$QUICK" = "1" ]; then  # tiny sizes: checks that every step still starts and parses its arguments
    L=tiny; S=32; P=32; B=2; R=1; CASES="tiny:32:16:2"; PRED="--config tiny --size 48 --patch 32"
    DEMO="--quick"; BLOCK="--block-size 8"; FWD="fp32,channels_last"; PRE="fp32,channels_last"
    LOADER="--shape 40 40 40 --volumes 4 --batches 4 --workers 0"
    FT="--config tiny --patch 32 --batch 2 --loader-steps 4 --repeats 2 --threads 1"
else
    L=resenc_l; S=160; P=160; B=6; R=5; CASES=""; PRED="--config resenc_l --size 320 --patch 160 --amp bf16"
    DEMO="--minutes 1"; BLOCK=""; FWD="fp32,channels_last,bf16,fp16"; PRE="fp32,bf16,fp16,channels_last"
    LOADER="--batches 20 --workers 8"
    FT="--config resenc_l --patch 160 --batch 2 --case-shape 192 224 192 --threads 4 --repeats 4"
fi

if [ "$DEVICE" = "cuda" ]; then
    step tests_gpu 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
else
    echo "tests_gpu skipped (DEVICE=$DEVICE)" | tee -a "$OUT/status.txt"
fi
step forward 60 "$PY" benchmarks/forward.py --config "$L" --size "$S" --batch 2 --device "$DEVICE" \
    --repeats "$R" --variants "$FWD"
# shellcheck disable=SC2086
step pretrain_step 90 "$PY" benchmarks/pretrain_step.py --recipe s3d-b --config "$L" --patch "$P" $BLOCK \
    --batch "$B" --device "$DEVICE" --repeats "$R" --variants "$PRE"
if [ "$DEVICE" = "cuda" ]; then  # compiling takes minutes on a CPU; on the GPU it gets its own limit
    # shellcheck disable=SC2086
    step pretrain_compile 75 "$PY" benchmarks/pretrain_step.py --recipe s3d-b --config "$L" --patch "$P" $BLOCK \
        --batch "$B" --device "$DEVICE" --repeats "$R" --variants fp32,compile
fi
if [ -n "$CASES" ]; then
    step sparse_engine 60 "$PY" benchmarks/sparse_engine.py --device "$DEVICE" --cases "$CASES" --repeats "$R"
else
    step sparse_engine 60 "$PY" benchmarks/sparse_engine.py --device "$DEVICE" --repeats "$R"
fi
# shellcheck disable=SC2086
step predict 45 "$PY" benchmarks/predict.py $PRED --device "$DEVICE" --repeats "$R"
# shellcheck disable=SC2086
step dataloader 30 "$PY" benchmarks/dataloader.py $LOADER --patch "$P" --device "$DEVICE" --skip-storage
# fine-tuning: ResEnc-L steps at 160^3 (fp32, bf16, channels_last) against the patch loader's rate
# shellcheck disable=SC2086
step finetune 60 "$PY" benchmarks/finetune_data.py $FT --device "$DEVICE"
if "$PY" -c "import nibabel" 2> /dev/null; then
    # the demo end to end on the GPU (--minutes sizes the runs; the report lands in $OUT/demo)
    # shellcheck disable=SC2086
    step demo 70 "$PY" -m s3d demo $DEMO --out "$OUT/demo" --no-progress --device "$DEVICE"
else
    echo "demo skipped: nibabel is not installed" | tee -a "$OUT/status.txt"
fi
echo "done; tables in $OUT/"
