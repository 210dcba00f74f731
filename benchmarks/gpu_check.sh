#!/usr/bin/env bash
# The prepared GPU check (one H100/H200; the parts' time limits add up to 600 s, so at most about 10 minutes;
# never part of CI):
#   1. DiT-B/2 π-ID step vs its networks at batch 64 and 256, bf16 autocast, K = 32: time (interleaved repeats,
#      median and spread) and peak memory (torch.cuda.max_memory_allocated) of each side;
#   2. the policy overhead on the GPU: a 128-substep K = 8 / 32 GM rollout (fused: compiled CUDA substeps) vs one
#      bf16 DiT-B/2 forward, at batch 8 and 64, with the rollout's memory-traffic floors measured in the same run;
#   3. a FLUX.2 [dev]-width block stack (6144 wide, 2 double + 8 single blocks, random bf16 weights) at 1024²:
#      one π-ID step and one 4-step sample;
#   4. the paper's ImageNet-256 student at real width: SiT-XL/2 (DiT-XL/2, 675M parameters) with a K = 32 GM head,
#      π-ID at 1 NFE (M = 2, batched interval CFG 3.2), batch 64, bf16 autocast with a bf16 teacher: one training step
#      (split into student / teacher / rollouts / backward / AdamW), one 1-NFE sample and one teacher forward, with
#      peak memory, to check the FLOP-based GPU-hours estimate of benchmarks/imagenet_xl.py (JSON written after
#      each stage, so a time-out keeps what finished).
# Usage: PYTHON=/path/to/python benchmarks/gpu_check.sh [results-folder]   (piflow and diffusers importable, CUDA torch)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu}
python=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
status=0

part() {    # part NAME SECONDS COMMAND...: run one part with a time limit, keep its log, go on if it fails
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - started)) s" | tee -a "$out/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

: > "$out/summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/summary.txt"
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/summary.txt"
part piid_step 180 "$python" benchmarks/piid_step.py --device cuda --dtype bfloat16 --models DiT-B/2 \
    --components 32 --batch 64 256 --repeats 5 --json "$out/piid_step.json"
part policy_overhead_b8 75 "$python" benchmarks/policy_overhead.py --device cuda --dtype bfloat16 --batch 8 \
    --repeats 7 --json "$out/policy_overhead_b8.json"
part policy_overhead_b64 75 "$python" benchmarks/policy_overhead.py --device cuda --dtype bfloat16 --batch 64 \
    --repeats 7 --json "$out/policy_overhead_b64.json"
part flux2_dev_stack_1024 90 "$python" benchmarks/real_dims.py --preset flux2-dev --num-layers 2 \
    --num-single-layers 8 --device cuda --resolution 1024 --text-tokens 512 --out "$out/flux2_dev_stack_1024.json"
part imagenet_xl_b64 180 "$python" benchmarks/imagenet_xl.py --device cuda --dtype bfloat16 --batch 64 \
    --repeats 3 --json "$out/imagenet_xl_b64.json"
exit $status
