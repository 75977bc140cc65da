#!/usr/bin/env bash
# The device scripts of the open issues in one call, each part under its own time limit, in the
# order given; output to $OUT/log.txt and one JSON per part under $OUT (at most 8 files come back):
#
#   cd <checkout> && scripts/gpu/parts.sh spec_check=90 kv_micro=90 long100k=330 spec=150
#
# From a clean export (what is committed, nothing else; the log names its commit):
#   git archive HEAD src scripts tests docs/runs pyproject.toml | tar -x -C .peers/clean
#   git rev-parse --short HEAD > .peers/clean/COMMIT
#
# Parts: budget (scripts/gpu/budget.py --quick), budget_kinds / budget_resident / budget_shared
# (new paths' cells; budget_shared: a shared_prefix plan's batch of 8), spec_check (float32/bf16
# speculative equality on CUDA), spec (verify-pass time 1..256 query tokens), kv_micro (one layer
# over compressed KV), long100k (routing_micro, KV codecs and routing at 100k on one 8B store),
# moe (Qwen3-30B-A3B and gpt-oss-20b shapes, llama.cpp when .peers/llamacpp is there; moe_core:
# only LRU and CPU experts off, OLLM_MOE_REPEAT=2 interleaved repeats; fewer runs than moe, untimed), batch8b (8B
# batch sweep on the largest batch's plan), batch_each (BATCHES=1,4,16,32,64 each on its own plan,
# static only), prefix6k (16 requests sharing a 6k-token prefix vs none, issue 13's prefix
# target; the shared case again with decode-resident layers unless PREFIX_RESIDENT=off; each case
# PREFIX_ROUNDS times, the median reported; the shared case again with mlp_cpu forced on if PREFIX_MLP_CPU=on), profile16 (batch 16 on its own plan: torch.profiler table and two steps' copy/compute
# timeline), profile_prefix (prefix6k's shared-prefix case on its shared_prefix plan stepped to
# decode: 3 decode steps' timeline with the host's phases between layers, 3 more synchronized);
# WORKLOADS=static,saturated for issue 13's arrivals target (Poisson at 4x the static rate);
# prefix6k_base / batch_each_base: the same with mlp_cpu off (the same call's baseline);
# mlp_cpu_check (the mlp_cpu decode path on CUDA: the five dense families, tiny, tokens equal
# to alone with two layers' MLP on the CPU, decode copies smaller by the skipped bytes);
# mlp_cpu_sweep (the prefix case's shared requests with MLP_COUNTS layers' MLP on the CPU;
# mlp_cpu_sweep16: batch 16 of distinct 2k prompts, RAM KV attended on the CPU as well).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=src:tests PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
PY=${PY:-python3}
LOG="$OUT/log.txt"
G=scripts/gpu
export OUT PY G

part() {
  case "$1" in
    budget) $PY $G/budget.py --out "$OUT/budget" --quick ;;
    budget_kinds) $PY $G/budget.py --out "$OUT/budget_kinds" --quick --kinds codec,batch,moe ;;
    budget_resident) $PY $G/budget.py --out "$OUT/budget_resident" --quick --kinds resident ;;
    budget_shared) $PY $G/budget.py --out "$OUT/budget_shared" --quick --kinds shared ;;
    spec_check) $PY $G/spec_correctness.py --device cuda:0 -o "$OUT/spec_correctness.json" ;;
    spec) $PY $G/speculative.py --out "$OUT/spec" --quick --no-check ;;
    kv_micro) $PY $G/kv_codec_micro.py --out "$OUT/kvm" ;;
    long100k) $PY $G/long_context.py --out "$OUT/long" --context 100000 \
      --parts "${LONG_PARTS:-capacity,routing_micro,kv_codec,routing}" \
      --decode-resident "${DECODE_RESIDENT:-off}" ;;
    long32k) $PY $G/long_context.py --out "$OUT/long32" --context 32768 \
      --parts "${LONG_PARTS:-kv_codec,routing}" ;;
    moe) $PY $G/moe.py --out "$OUT/moe" --gpt-oss ;;
    moe_core) OLLM_MOE_NO_LFU=1 OLLM_MOE_NO_LOOKAHEAD=1 OLLM_MOE_REPEAT=${OLLM_MOE_REPEAT:-2} \
      $PY $G/moe.py --out "$OUT/moe" --gpt-oss ;;  # LRU, CPU experts off, repeats, llama.cpp
    batch8b) $PY $G/batch_engine.py --out "$OUT/batch" --skip-equiv --skip-tiers \
      --skip-throughput --bench-synthetic llama3-8b --bench-budget 8GiB \
      --bench-batches "${BATCHES:-16,64}" --bench-new "${BATCH_NEW:-32}" \
      --bench-workloads "${WORKLOADS:-static,arrivals,prefix}" ;;
    batch_each|batch_each_base) local bs=${BATCHES:-1,4,16,32,64} tag=${1#batch_each}
      [ -n "$tag" ] && export OLLM_BENCH_KW='{"mlp_cpu": false}'
      for b in ${bs//,/ }; do  # each batch size with the plan for its own batch
        $PY $G/batch_engine.py --out "$OUT/batch_$b$tag" --skip-equiv --skip-tiers \
          --skip-throughput --bench-synthetic llama3-8b --bench-budget 8GiB --bench-batches "$b" \
          --bench-new "${BATCH_NEW:-32}" --bench-workloads static || return $?
      done ;;
    profile16) $PY $G/batch_engine.py --out "$OUT/profile16" --skip-equiv --skip-tiers \
      --skip-throughput --skip-bench --bench-synthetic llama3-8b --bench-budget 8GiB \
      --bench-batches 16 --profile-steps 3 --profile-batch 16 --profile-plan-batch 16 ;;
    profile_prefix) $PY $G/batch_engine.py --out "$OUT/profile_prefix" --skip-equiv \
      --skip-tiers --skip-throughput --skip-bench --bench-synthetic llama3-8b \
      --bench-budget 8GiB --bench-prompt "${PREFIX_PROMPT:-6176}" --profile-prefix 3 ;;
    prefix6k|prefix6k_base) [ "$1" = prefix6k_base ] && export OLLM_BENCH_KW='{"mlp_cpu": false}'
      $PY $G/batch_engine.py --out "$OUT/$1" --skip-equiv --skip-tiers \
      --skip-throughput --bench-synthetic llama3-8b --bench-budget 8GiB --bench-batches 16 \
      --bench-new "${BATCH_NEW:-16}" --bench-prompt 6176 --bench-workloads prefix \
      --bench-prefix-rounds "${PREFIX_ROUNDS:-1}" \
      $([ "${PREFIX_MLP_CPU:-off}" = on ] && echo --bench-prefix-mlp-cpu) \
      $([ "${PREFIX_RESIDENT:-on}" = on ] && echo --bench-prefix-resident) ;;
    mlp_cpu_check) $PY $G/mlp_cpu_check.py --out "$OUT/mlp_cpu_check.json" ;;
    mlp_cpu_sweep) $PY $G/mlp_cpu_sweep.py --out "$OUT/mlp_cpu_sweep.json" \
      --counts "${MLP_COUNTS:-0,4,7,10,14,21}" --rounds "${PREFIX_ROUNDS:-2}" ;;
    mlp_cpu_sweep16) $PY $G/mlp_cpu_sweep.py --out "$OUT/mlp_cpu_sweep16.json" --distinct \
      --prompt 2080 --new 32 --counts "${MLP_COUNTS:-0,4,7,14}" --rounds 1 ;;
    *) echo "unknown part $1" ; return 2 ;;
  esac
}
export -f part

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1
# The commit: a clean export (git archive, no .git) carries it in COMMIT; else the checkout's.
cat COMMIT >>"$LOG" 2>/dev/null || git -C . rev-parse --short HEAD >>"$LOG" 2>/dev/null || true
for spec in "$@"; do
  name=${spec%%=*}
  limit=${spec#*=}
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" bash -c 'part "$0"' "$name" >>"$LOG" 2>&1
  rc=$?
  echo "=== $name rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
done
# Each part's JSON one level down, flattened to $OUT (the tool returns at most 8 files).
for f in "$OUT"/*/*.json; do
  [ -e "$f" ] || continue
  d=$(basename "$(dirname "$f")")
  mv "$f" "$OUT/${d}_$(basename "$f")"
done
