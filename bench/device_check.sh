#!/usr/bin/env bash
# Everything that needs a GPU, in one call on a lent GPU machine (no network): build stopkit with
# its CUDA kernels, the CUDA tests (every op against its oracle, the launch plan against the
# runtime, multi-GPU placement when two GPUs are present, CUDA-graph capture of a decode step),
# the attention tests again with plans forced to a 99 KB part's limit, compute-sanitizer memcheck
# and racecheck on a reduced grid (racecheck also at the 99 KB limit: 2 pipeline stages), then the
# CUDA benchmarks, then the compiled engine (the custom ops' and Engine(compile=True)'s CUDA tests,
# and decode tokens/s of a 1.5B-shaped model at batch 64: eager, CUDA graphs, inductor + CUDA
# graphs); a short table last. Everything it measures goes under $OUT.
#
#   bash bench/device_check.sh                 # from the repository root: about 7 minutes
#   DEVICE_CHECK_STAGES="tests_cuda memcheck" bash bench/device_check.sh   # a rerun of some stages
#   DEVICE_CHECK_STAGES=compile DEVICE_CHECK_SECONDS=300 bash bench/device_check.sh  # compile alone
#
# Device time is 15 minutes a session, a machine start included, so the default deadline
# (DEVICE_CHECK_SECONDS, 400 s for the whole script) leaves room for a rerun of the stages that
# failed: call the device tool with timeout_s=450. Stages share the deadline: a slow stage
# shortens the later ones instead of running past it. The build targets sm_90 only (the H200;
# STOPKIT_CUDA_ARCHS overrides) and is kept for a rerun while the machine is warm.
# Wheels the machine lacks (e.g. FlashInfer) are installed from .whl/ when that folder exists.
# $OUT gets build.log, stages.log (every later stage's output), bench.json (pytest-benchmark) and
# device_check.json (each stage's status and the benchmark rows).
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
DEADLINE=$((SECONDS + ${DEVICE_CHECK_SECONDS:-400}))
STAGES="${DEVICE_CHECK_STAGES:-tests_cuda tests_99kb cases memcheck racecheck racecheck_99kb bench compile}"
SMEM_99KB=101376
PY=python3
export PATH="/usr/local/cuda/bin:$PATH"
declare -A STATUS=()

left() { echo $((DEADLINE - SECONDS)); }
wanted() { [[ " $STAGES " == *" $1 "* ]]; }
stage() {  # stage NAME SECONDS_MAX CMD...: run CMD under a timeout, log to stages.log, record rc
  local name=$1 max=$2 budget rc=0
  shift 2
  wanted "$name" || return 0
  budget=$(left)
  ((budget > max)) && budget=$max
  if ((budget < 20)); then
    echo "== $name: skipped (no time left)"
    STATUS[$name]=skipped
    return 0
  fi
  echo "== $name (<= ${budget}s): $*" | tee -a "$OUT/stages.log"
  local t0=$SECONDS
  timeout --kill-after=10 "$budget" "$@" 2>&1 | tee -a "$OUT/stages.log" || rc=$?
  if [[ $rc == 124 || $rc == 137 ]]; then
    STATUS[$name]="timeout $((SECONDS - t0))s"
  else
    STATUS[$name]="rc=$rc $((SECONDS - t0))s"
  fi
  echo "== $name: ${STATUS[$name]}"
  return 0
}

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$OUT/stages.log" || true
$PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name())"
nvcc --version | tail -1 || true

if [[ -d .whl ]] && compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---- build (fatal on failure: nothing else can run) ----
# CMake directly, as setup.py drives it, into build/device: a rerun on a warm machine rebuilds
# only what changed. The modules land in stopkit/, imported from the checkout.
t0=$SECONDS
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  cmake -S . -B build/device -G Ninja -DCMAKE_BUILD_TYPE=Release -DSTOPKIT_CUDA=ON \
    -DSTOPKIT_CUDA_ARCHS="${STOPKIT_CUDA_ARCHS:-90-real}" -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/stopkit" -DPython_EXECUTABLE="$(command -v $PY)" \
    -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" &&
  cmake --build build/device -j "$(nproc)"
} > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
grep -iE "warning|error" "$OUT/build.log" | head -20 || true
$PY - <<'PY'
import torch
import stopkit._C_cuda as m
from stopkit import ops
assert ops.cuda_available()
dev = torch.cuda.current_device()
props = m.device_properties(dev)
print("built; device", props)
limit = props["max_smem_per_block_optin"]
print(f"{'dtype':<9} {'D':>4} {'q_len x group':>13} {'stages':>6} {'smem':>7} {'blocks/SM':>9} {'runtime':>7}")
for dtype, code in ((torch.float32, 0), (torch.bfloat16, 2)):
    for D in (64, 128, 256):
        for S, G in ((1, 8), (16, 4)):
            for forced in (limit, 101376):
                m.set_smem_limit(forced)
                plan = ops.cuda_launch_plan(dtype, D, S, forced, group_size=G)
                occ = m.paged_attention_occupancy(dtype=code, head_dim=D, rows=S * G, device=dev)
                print(f"{str(dtype)[6:]:<9} {D:>4} {f'{S} x {G}':>13} {plan['stages']:>6} {plan['smem_bytes']:>7} "
                      f"{plan['blocks_per_sm']:>9} {occ:>7}{'   (99 KB plan)' if forced != limit else ''}")
m.set_smem_limit(0)
PY
STATUS[build]="ok $((SECONDS - t0))s"

# ---- the CUDA tests (test ids with "cuda" and the CUDA-only files), the 99 KB plans, sanitizers,
# ---- benchmarks ----
stage tests_cuda 170 $PY -m pytest tests -q -x -k cuda -p no:cacheprovider \
  --ignore=tests/test_compile.py --ignore=tests/test_custom_ops.py  # (the compile stage's)
stage tests_99kb 70 env STOPKIT_CUDA_SMEM_LIMIT=$SMEM_99KB $PY -m pytest tests/test_paged_attention.py \
  tests/test_cuda_device.py -q -x -p no:cacheprovider \
  -k "cuda and (grid or every_head_dim or split_context or queries_per_kv_head or graph)"

CASES="$(mktemp -d)/sanitizer_cases.py"
cat > "$CASES" <<'PY'
"""Small cases of every CUDA op (compared with the torch oracle), for compute-sanitizer."""
import sys
import torch
from stopkit import ops, reference, _C_cuda

dev = torch.device("cuda")
torch.manual_seed(0)
racecheck = len(sys.argv) > 1 and sys.argv[1] == "race"
bad = 0


def close(name, got, want, tol):
    global bad
    err = float((got.float() - want.float()).abs().max()) / max(float(want.float().abs().max()), 1e-6)
    ok = err <= tol and bool(torch.isfinite(got.float()).all())
    bad += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e}")


def attention(dtype, D, bs, S, heads, lens, suffix, sinks, window, splits, bad_block=False):
    H, Hkv = heads
    B = len(lens)
    used = [(n + bs - 1) // bs for n in lens]
    M, NB = max(used) + 1, sum(used) + 3
    ids = torch.randperm(NB)
    table = torch.full((B, M), -7, dtype=torch.int32)  # unused entries: out of range on purpose
    at = 0
    for b, u in enumerate(used):
        table[b, :u] = ids[at:at + u]
        at += u
    kw = dict(q=torch.randn(B, S, H, D), k_cache=torch.randn(NB, bs, Hkv, D),
              v_cache=torch.randn(NB, bs, Hkv, D), block_table=table,
              seq_lens=torch.tensor(lens, dtype=torch.int32))
    if suffix:
        kw.update(suffix_k=torch.randn(B, S, Hkv, D), suffix_v=torch.randn(B, S, Hkv, D))
    if sinks:
        kw["sinks"] = torch.randn(H)
    kw = {k: (v.to(dev, dtype) if v.is_floating_point() and k != "sinks" else v.to(dev)) for k, v in kw.items()}
    _C_cuda.set_num_splits(splits)
    try:
        if bad_block:  # an in-use id past the cache: the kernel must skip it, never read it
            kw["block_table"][0, 0] = NB + 1000
            out = ops.paged_attention(**kw, window=window, check_indices=False)
            torch.cuda.synchronize()
            close("paged_attention out-of-range block id skipped", out, out.nan_to_num(1e30), 0)
            return
        out, lse = ops.paged_attention(**kw, window=window, return_lse=True)
        up = {k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()}
        ro, rl = reference.paged_attention(**up, window=window, return_lse=True)
        name = f"paged_attention {dtype} D={D} bs={bs} S={S} H={H}/{Hkv} lens={lens} suffix={suffix} sinks={sinks} window={window} splits={splits}"
        close(name, out, ro, 1e-5 if dtype == torch.float32 else 2e-2)
        fin = torch.isfinite(rl)
        same_inf = bool((torch.isneginf(lse) == ~fin).all())
        close(name + " lse" + ("" if same_inf else " (-inf pattern differs)"),
              torch.where(fin, lse.double(), 0), torch.where(fin, rl, 0), 1e-5 if same_inf else -1)
    finally:
        _C_cuda.set_num_splits(0)


def stop_score(hd, wd, B, d, h):
    x = 3 * torch.randn(B, d, device=dev).to(hd)
    kw = dict(norm_weight=torch.randn(d, device=dev).to(wd), head_bias=torch.randn(2, device=dev).to(wd))
    if h:
        kw.update(hidden_weight=(torch.randn(h, d, device=dev) / d ** 0.5).to(wd),
                  hidden_bias=torch.randn(h, device=dev).to(wd))
    w = (torch.randn(2, h or d, device=dev) / 8).to(wd)
    up = {k: v.double() for k, v in kw.items()}
    close(f"stop_score {hd}/{wd} B={B} d={d} h={h}", ops.stop_score(x, w, **kw),
          reference.stop_score(x.double(), w.double(), **up), 1e-5)


if racecheck:  # shared-memory hazards of the pipeline: several tiles, every stage reused
    attention(torch.bfloat16, 128, 16, 4, (8, 2), [300, 77], True, True, None, 0)
    attention(torch.float32, 64, 8, 1, (4, 1), [200], False, False, 50, 2)
    attention(torch.float16, 96, 32, 16, (4, 1), [150], True, False, None, 0)
    attention(torch.bfloat16, 256, 16, 16, (4, 1), [90], True, False, None, 0)   # 4 query slices
    stop_score(torch.float32, torch.float32, 19, 1100, 70)   # tiles, chunks, the last-block ticket
else:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        attention(dtype, 128, 16, 4, (8, 2), [37, 0, 130], True, True, None, 0)
        attention(dtype, 64, 8, 1, (4, 4), [65, 3], False, False, 20, 3)
    attention(torch.bfloat16, 256, 256, 2, (2, 1), [600], True, False, 100, 0)
    attention(torch.bfloat16, 48, 8, 16, (12, 1), [40], True, True, None, 5)     # 192 query rows
    attention(torch.float32, 160, 64, 7, (6, 3), [0, 90], True, True, 9, 2)
    attention(torch.bfloat16, 128, 16, 1, (8, 2), [500], False, False, None, 64)  # many empty splits
    attention(torch.bfloat16, 128, 16, 4, (8, 2), [100, 50], True, False, None, 2, bad_block=True)
    # write_kv: -1 skips; unaligned row sizes take the narrow-vector kernels
    for dtype, Hkv, D in ((torch.float32, 2, 64), (torch.bfloat16, 2, 2), (torch.float16, 2, 5), (torch.bfloat16, 1, 3)):
        k, v = (torch.randn(9, Hkv, D, device=dev).to(dtype) for _ in range(2))
        kc, vc = (torch.randn(4, 8, Hkv, D, device=dev).to(dtype) for _ in range(2))
        slots = torch.tensor([0, 5, -1, 31, 8, -1, 17, 2, 9], device=dev)
        kc2, vc2 = kc.clone(), vc.clone()
        ops.write_kv(k, v, kc, vc, slots)
        reference.write_kv(k, v, kc2, vc2, slots)
        close(f"write_kv {dtype} Hkv={Hkv} D={D}", torch.cat([kc, vc]), torch.cat([kc2, vc2]), 0)
    # copy_blocks over every plane of a [layers, 2, blocks, ...] cache; odd sizes too
    for dtype, D in ((torch.bfloat16, 16), (torch.float32, 5), (torch.uint8, 3)):
        cache = torch.randint(0, 100, (3, 2, 10, 4, 2, D), device=dev).to(dtype)
        src, dst = torch.tensor([1, 4, 7], device=dev), torch.tensor([0, 9, 2], device=dev)
        want = cache.clone()
        reference.copy_blocks(want, src, dst)
        ops.copy_blocks(cache, src, dst)
        close(f"copy_blocks {dtype} D={D}", cache.float(), want.float(), 0)
    # stop_score: the head alone and the tiled hidden layer (ragged tiles and chunks), mixed dtypes
    for hd, wd, B, d, h in ((torch.float32, torch.float32, 11, 72, 0), (torch.bfloat16, torch.float32, 19, 1100, 70),
                            (torch.float16, torch.bfloat16, 11, 72, 0), (torch.float32, torch.float16, 9, 600, 33)):
        stop_score(hd, wd, B, d, h)
torch.cuda.synchronize()
print("CASES", "FAILED" if bad else "PASSED")
sys.exit(1 if bad else 0)
PY

stage cases 60 $PY "$CASES"
SAN="$(command -v compute-sanitizer || echo /usr/local/cuda/compute-sanitizer/compute-sanitizer)"
# No caching allocator under the sanitizer: an overrun then lands outside any allocation.
stage memcheck 100 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 9 $PY "$CASES"
stage racecheck 70 "$SAN" --tool racecheck --error-exitcode 9 $PY "$CASES" race
stage racecheck_99kb 70 env STOPKIT_CUDA_SMEM_LIMIT=$SMEM_99KB "$SAN" --tool racecheck --error-exitcode 9 $PY "$CASES" race

BENCH_FILES=()
for f in bench/test_bench_paged_attention.py bench/test_bench_ops.py; do
  if [[ -f $f ]]; then BENCH_FILES+=("$f"); fi
done
stage bench 200 $PY -m pytest "${BENCH_FILES[@]}" -k cuda --bench-devices cuda -p no:cacheprovider -q \
  --benchmark-json="$OUT/bench.json" --benchmark-columns=median,iqr,rounds

# The compiled engine: its CUDA tests (inductor compiles of tiny models), then, whatever they
# gave, the decode benchmark of the 1.5B shape, its modes in order of compile time (a timeout
# loses the slowest); each line is printed as it is measured and kept in stages.log.
compile_stage() {
  local rc=0
  $PY -m pytest tests/test_custom_ops.py tests/test_compile.py -q -k cuda -p no:cacheprovider || rc=$?
  $PY -m pytest bench/test_bench_compile.py -k "cuda and 1.5B" -s -q --bench-devices cuda \
    -p no:cacheprovider --benchmark-json="$OUT/bench_compile.json" || rc=$?
  return $rc
}
export -f compile_stage
export PY OUT
stage compile 280 bash -c compile_stage

# ---- summary: stage status and the kernel table (ours vs the reference and peers) ----
{
  for k in "${!STATUS[@]}"; do printf '%s\t%s\n' "$k" "${STATUS[$k]}"; done
} > /tmp/device_check_status.tsv
$PY - "$OUT" "build $STAGES" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
stages = sys.argv[2].split()
status = dict(line.split("\t", 1) for line in pathlib.Path("/tmp/device_check_status.tsv").read_text().splitlines())
rows = []
bench = out / "bench.json"
if bench.exists():
    for b in json.loads(bench.read_text())["benchmarks"]:
        e = b.get("extra_info", {})
        rows.append(dict(name=b["name"].removeprefix("test_"), ms=b["stats"]["median"] * 1e3,
                         gbps=e.get("gbps"), copy=e.get("copy_fraction"), vs_ref=e.get("speedup_vs_reference")))
compiled = []
if (out / "bench_compile.json").exists():
    for b in json.loads((out / "bench_compile.json").read_text())["benchmarks"]:
        e = b.get("extra_info", {})
        compiled.append(dict(name=b["name"].removeprefix("test_"), tokens_per_s=e.get("tokens_per_s"),
                             eager_tokens_per_s=e.get("eager_tokens_per_s"), speedup=e.get("speedup"),
                             compile_s=e.get("compile_s")))
json.dump(dict(status=status, bench=rows, compile=compiled), open(out / "device_check.json", "w"), indent=1)
print("\n==== device_check summary ====")
for k in stages:
    print(f"{k:<15} {status.get(k, 'not run')}")
if rows:
    print(f"\n{'benchmark':<72} {'ms':>8} {'GB/s':>7} {'%copy':>6} {'x ref':>6}")
    for r in rows:
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"
        print(f"{r['name'][:72]:<72} {r['ms']:8.3f} {f(r['gbps'], '7.0f'):>7} "
              f"{f(r['copy'] and 100 * r['copy'], '5.1f'):>6} {f(r['vs_ref'], '6.1f'):>6}")
if compiled:
    print(f"\n{'decode (compile stage)':<40} {'tokens/s':>9} {'eager':>9} {'x eager':>8} {'compile s':>10}")
    for r in compiled:
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"
        print(f"{r['name'][:40]:<40} {f(r['tokens_per_s'], '9.0f'):>9} {f(r['eager_tokens_per_s'], '9.0f'):>9} "
              f"{f(r['speedup'], '8.2f'):>8} {f(r['compile_s'], '10.1f'):>10}")
bad = [k for k in stages if not status.get(k, "not run").startswith(("ok", "rc=0"))]
print("\nRESULT:", "all stages passed" if not bad else "problems in " + ", ".join(bad))
sys.exit(1 if bad else 0)
PY
