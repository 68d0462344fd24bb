#!/usr/bin/env bash
# What only a GPU measures, in one command (about 8 minutes on one H100):
#
#   benchmarks/gpu_suite.sh                 # on a CUDA machine: writes benchmarks/results/gpu-*.json
#   benchmarks/gpu_suite.sh --cpu-smoke     # anywhere: the same stages on the CPU, tiny shapes (a few minutes)
#   benchmarks/gpu_suite.sh --out-dir DIR   # the JSON files go to DIR instead
#
# Stages, in order of what matters most, each with a time limit (a stage past its limit is recorded
# as timed out and the suite goes on):
#   1. tests/test_gpu.py: the Triton NF4 kernel bit-exact with bitsandbytes' CUDA kernel, the fused
#      layers in bf16 and fp16 (LoRA, LoRA-FA, VeRA, QLoRA, with and without dropout), dropout's
#      device path, the whole model under torch.compile against eager;
#   2. benchmarks/bench_step.py, paired and interleaved: the Llama-3.2-1B shape, bf16, batch 4 x 2048,
#      r = 16 on the seven projections: lorakit LoRA, DoRA, VeRA, AdaLoRA and QLoRA against PEFT's
#      (and PEFT over bitsandbytes NF4 where bitsandbytes is installed), against the frozen-base limit;
#   3. the same with torch.compile for LoRA against the compiled limit;
#   4. benchmarks/bench_qlora_big.py: the Llama-3-8B shape QLoRA step's time and peak memory
#      (lorakit, PEFT + bitsandbytes, the bf16 limit), each in its own process.
# A summary (each stage's exit status and seconds) goes to gpu-suite-<time>.json beside the others.
set -u -o pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
mode=gpu
out_dir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) mode=cpu-smoke ;;
        --out-dir)
            if [ $# -lt 2 ] || [ -z "$2" ]; then echo "error: --out-dir needs a directory" >&2; exit 2; fi
            out_dir="$2"; shift ;;
        -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $1 (--cpu-smoke, --out-dir DIR)" >&2; exit 2 ;;
    esac
    shift
done

cd "$root"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python3}"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"

if [ "$mode" = gpu ]; then
    if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "error: no CUDA device visible to torch (run with --cpu-smoke to exercise the suite on the CPU)" >&2
        exit 2
    fi
    out_dir="${out_dir:-$root/benchmarks/results}"
    prefix="gpu"
    test_env=()
    step_args=(--device cuda --model llama-1b --dtype bfloat16 --batch 4 --seq 2048 --r 16 --steps 3)
    compile_args=(--compile-backend inductor)
    big_args=(--device cuda --model llama-8b --seq 2048 --steps 3 --warmup 1)
    limits=(170 190 120 100)   # seconds per stage: 580 s at most, about 8 minutes
else
    out_dir="${out_dir:-$(mktemp -d "${TMPDIR:-/tmp}/lorakit-gpu-smoke-XXXXXX")}"
    prefix="gpu-smoke"
    export OMP_NUM_THREADS=1  # a shared CPU: 2-thread OpenMP steps stall whenever a core is taken
    test_env=(LORAKIT_GPU_TESTS_ON_CPU=1)
    step_args=(--device cpu --model tiny --dtype float32 --batch 2 --seq 64 --r 16 --vera-r 32 --steps 2 --threads 1)
    compile_args=(--compile-backend aot_eager)
    big_args=(--device cpu --model tiny --seq 128 --steps 1 --warmup 1)
    limits=(600 300 300 300)
fi
mkdir -p "$out_dir" && [ -w "$out_dir" ] || { echo "error: cannot write to $out_dir" >&2; exit 2; }
summary="$out_dir/$prefix-suite-$stamp.json"
stages=()

run_stage() {  # name, limit in seconds, command...
    local name="$1" limit="$2"
    shift 2
    echo "=== $name (at most ${limit}s): $*"
    local start end rc
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    end=$(date +%s)
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "=== $name: timed out after ${limit}s"
    stages+=("{\"stage\": \"$name\", \"exit\": $rc, \"seconds\": $((end - start)), \"timed_out\": $([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo true || echo false)}")
}

run_stage tests "${limits[0]}" env "${test_env[@]}" "$python" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    --junitxml "$out_dir/$prefix-tests-$stamp.xml"
run_stage step "${limits[1]}" "$python" benchmarks/bench_step.py "${step_args[@]}" \
    --methods lora dora vera adalora qlora --out "$out_dir/$prefix-step-$stamp.json"
run_stage step-compiled "${limits[2]}" "$python" benchmarks/bench_step.py "${step_args[@]}" \
    --methods lora --no-peft --no-memory --compile "${compile_args[@]}" --out "$out_dir/$prefix-step-compiled-$stamp.json"
run_stage qlora-8b "${limits[3]}" "$python" benchmarks/bench_qlora_big.py "${big_args[@]}" \
    --out "$out_dir/$prefix-qlora-8b-$stamp.json"

joined="$(IFS=,; echo "${stages[*]}")"
"$python" - "$summary" "$mode" "$joined" <<'EOF'
import json, subprocess, sys

path, mode, stages = sys.argv[1], sys.argv[2], json.loads("[" + sys.argv[3] + "]")
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    gpu = None
with open(path, "w") as f:
    json.dump({"suite": "gpu_suite.sh", "mode": mode, "gpu": gpu, "stages": stages}, f, indent=1)
print(f"saved {path}")
for s in stages:
    print(f"  {s['stage']:14s} exit {s['exit']:3d}  {s['seconds']:4d} s" + ("  (timed out)" if s["timed_out"] else ""))
sys.exit(0 if all(s["exit"] == 0 for s in stages) else 1)
EOF
