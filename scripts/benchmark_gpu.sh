#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one command (one lease of a GPU machine):
#
#     OUT=/tmp/neo_gpu bash scripts/benchmark_gpu.sh
#
# 1. versions, the card and its clocks; the bfloat16 matrix-product rate through JAX
#    (8192^3, random data), the ceiling the MFU is read against beside the data sheet's;
# 2. a smoke test: the tiny model's bfloat16 step with GPT-Neo's local layers, which stops the
#    script before the large compiles if this JAX cannot build neo's step;
# 3. gpt_neo_1.3B at n_ctx 2048, bfloat16, flash attention (attention_impl auto = cuDNN), no
#    remat: neo batch 8 with its layers scanned (the default) and unrolled (scan_layers false,
#    traced), then the nanoGPT-style PyTorch reference (F.scaled_dot_product_attention,
#    autocast) on the same batch;
# 4. batch 4: neo unrolled, then transformers' GPTNeo (autocast; eager attention, the only one
#    it has without the flash-attn package; at batch 8 it runs out of the card's memory);
# 5. neo batch 8 with GPT-Neo's own recompute_grad (full remat), scanned;
# 6. neo scanned with `remat_policy: save_dots` (what docs/configs.md advises where compile time
#    must stay flat with depth), batch 8 and 16.
#
# Each run is its own process with its own time limit; the RESULT lines gather in
# $OUT/results.jsonl, everything printed in $OUT/log (each run's full output in $WORK), and a
# trace of two steps of the unrolled run in $OUT/profile_b8.json.gz (Perfetto's trace-event
# JSON: GPU kernels with their durations). Imports no TensorFlow and no lm-eval. About seven
# minutes on an H200, most of it compiling and initialising.
set -u
OUT=${OUT:-/tmp/neo_gpu}
WORK=${WORK:-/tmp/neo_gpu_work}
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
cd "$(dirname "$0")/.."
exec > >(tee -a "$OUT/log") 2>&1

stamp() { echo "== $(date -u +%H:%M:%S) $*"; }

stamp versions
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit \
    --format=csv 2>&1 | head -3
$PY - <<'EOF'
import importlib, platform
for m in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "torch", "transformers"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:
        print(m, "missing:", e)
import jax
print("python", platform.python_version(), "devices", jax.devices(), "kind", jax.devices()[0].device_kind)
EOF

stamp matmul ceiling
$PY - <<'EOF'
import time, jax, jax.numpy as jnp
n = 8192
a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (0, 1))
f = jax.jit(lambda a, b: a @ b)
f(a, b).block_until_ready()
ts = []
for _ in range(20):
    t = time.perf_counter(); f(a, b).block_until_ready(); ts.append(time.perf_counter() - t)
ts.sort()
print(f"jax bf16 {n}^3 matmul: median {2 * n**3 / ts[len(ts) // 2] / 1e12:.0f} TFLOP/s, best {2 * n**3 / ts[0] / 1e12:.0f}")
EOF

run() {  # run LIMIT_S NAME ARGS...: one benchmark process; its RESULT line tagged with NAME
    local limit=$1 name=$2; shift 2
    stamp "$name: $*"
    local start=$SECONDS
    timeout "$limit" $PY scripts/benchmark.py "$@" > "$WORK/$name.out" 2>&1
    local rc=$?
    grep -v '^RESULT ' "$WORK/$name.out" | grep -v -i 'warning' | tail -25
    grep '^RESULT ' "$WORK/$name.out" | sed "s/^RESULT {/{\"run\": \"$name\", \"wall_s\": $((SECONDS - start)), /" \
        | tee -a "$OUT/results.jsonl"
    echo "-- $name: exit $rc after $((SECONDS - start)) s"
    return $rc
}

BIG=(--model gpt_neo_1.3B --seq 2048 --steps 10 --warmup 2 --precision bfloat16)
run 150 smoke --backend neo --model tiny --batch 4 --seq 512 --steps 3 --warmup 1 --precision bfloat16 \
    || { stamp "smoke test failed: stopping"; exit 1; }
run 120 neo_b8_scanned --backend neo "${BIG[@]}" --batch 8 --set recompute_grad=false
run 150 neo_b8_unrolled --backend neo "${BIG[@]}" --batch 8 --set recompute_grad=false --set scan_layers=false \
    --profile "$WORK/prof_b8"
cp "$(find "$WORK/prof_b8" -name perfetto_trace.json.gz | head -1)" "$OUT/profile_b8.json.gz"
run 100 nanogpt_b8 --backend nanogpt "${BIG[@]}" --batch 8
run 120 neo_b4_unrolled --backend neo "${BIG[@]}" --batch 4 --set recompute_grad=false --set scan_layers=false
run 100 transformers_b4 --backend transformers "${BIG[@]}" --batch 4
run 120 neo_b8_fullremat --backend neo "${BIG[@]}" --batch 8
run 90 neo_b8_scanned_save_dots --backend neo "${BIG[@]}" --batch 8 --set remat_policy='"save_dots"'
run 90 neo_b16_scanned_save_dots --backend neo "${BIG[@]}" --batch 16 --set remat_policy='"save_dots"'
stamp done
$PY - "$OUT/results.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['run']:20} {r['backend']:22} step {r['step_s']:.4f} s  {r['tokens_per_s']:>10,.0f} tok/s  "
          f"MFU {100 * r['mfu']:5.1f}%  compile {r.get('compile_s', 0):5.1f} s  loss {r['loss']:.3f}  "
          f"{r.get('custom_calls', '')}")
EOF
