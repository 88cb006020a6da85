#!/usr/bin/env bash
# One call on a lent GPU machine (no network): build stopkit with its CUDA kernels, run the CUDA
# tests, compute-sanitizer on a small case of every op, then the CUDA benchmarks; a short table
# last. Everything it measures goes under $OUT (the device tool brings that folder back).
#
#   bash bench/device_check.sh            # from the repository root, inside ~8 minutes
#
# Wheels the machine lacks (e.g. FlashInfer) are installed from .whl/ when that folder exists.
# Stages after the build share a deadline, so a slow stage shortens the later ones instead of
# running past the device tool's limit. $OUT gets four files (the tool brings back at most 8):
# build.log, stages.log (every later stage's output), bench.json (pytest-benchmark) and
# device_check.json (each stage's status and the benchmark rows).
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
DEADLINE=$((SECONDS + ${DEVICE_CHECK_SECONDS:-470}))
PY=python3
export PATH="/usr/local/cuda/bin:$PATH"
declare -A STATUS=()

left() { echo $((DEADLINE - SECONDS)); }
stage() {  # stage NAME SECONDS_MAX CMD...: run CMD under a timeout, log to stages.log, record rc
  local name=$1 max=$2 budget rc=0
  shift 2
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
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/stages.log" || true
$PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
nvcc --version | tail -1 || true

if [[ -d .whl ]] && compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---- build (fatal on failure: nothing else can run) ----
t0=$SECONDS
STOPKIT_CUDA=1 MAX_JOBS="$(nproc)" $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
grep -iE "warning|error" "$OUT/build.log" | grep -v "^WARNING: Running pip as" | head -20 || true
$PY -c "import stopkit._C_cuda as m, stopkit.ops as ops; assert ops.cuda_available(); print('built; device', m.device_properties(0))"
STATUS[build]="ok $((SECONDS - t0))s"

# ---- the ops' CUDA tests first (fast), sanitizers, benchmarks, then the whole suite ----
stage tests_cuda 150 $PY -m pytest tests/test_ops.py tests/test_paged_attention.py -q -x -k cuda -p no:cacheprovider

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


if racecheck:  # shared-memory hazards of the pipeline: several tiles, every stage reused
    attention(torch.bfloat16, 128, 16, 4, (8, 2), [300, 77], True, True, None, 0)
    attention(torch.float32, 64, 8, 1, (4, 1), [200], False, False, 50, 2)
    attention(torch.float16, 96, 32, 16, (4, 1), [150], True, False, None, 0)
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
    # stop_score: plain head and the hidden-layer variant, mixed dtypes
    for hd, wd, h in ((torch.float32, torch.float32, 0), (torch.bfloat16, torch.float32, 20), (torch.float16, torch.bfloat16, 0)):
        x = 3 * torch.randn(11, 72, device=dev).to(hd)
        kw = dict(norm_weight=torch.randn(72, device=dev).to(wd), head_bias=torch.randn(2, device=dev).to(wd))
        if h:
            kw.update(hidden_weight=torch.randn(h, 72, device=dev).to(wd) / 8, hidden_bias=torch.randn(h, device=dev).to(wd))
        w = torch.randn(2, h or 72, device=dev).to(wd) / 8
        close(f"stop_score {hd}/{wd} h={h}", ops.stop_score(x, w, **kw), reference.stop_score(x, w, **kw), 1e-5)
torch.cuda.synchronize()
print("CASES", "FAILED" if bad else "PASSED")
sys.exit(1 if bad else 0)
PY

stage cases 60 $PY "$CASES"
SAN="$(command -v compute-sanitizer || echo /usr/local/cuda/compute-sanitizer/compute-sanitizer)"
# No caching allocator under the sanitizer: an overrun then lands outside any allocation.
stage memcheck 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 9 $PY "$CASES"
stage racecheck 90 "$SAN" --tool racecheck --error-exitcode 9 $PY "$CASES" race

BENCH_FILES=()
for f in bench/test_bench_paged_attention.py bench/test_bench_ops.py; do
  if [[ -f $f ]]; then BENCH_FILES+=("$f"); fi
done
stage bench 220 $PY -m pytest "${BENCH_FILES[@]}" -k cuda --bench-devices cuda -p no:cacheprovider -q \
  --benchmark-json="$OUT/bench.json" --benchmark-columns=median,iqr,rounds
stage tests_all 240 $PY -m pytest tests -x -q -p no:cacheprovider

# ---- summary: stage status and the kernel table (ours vs the reference and peers) ----
{
  for k in "${!STATUS[@]}"; do printf '%s\t%s\n' "$k" "${STATUS[$k]}"; done
} > /tmp/device_check_status.tsv
$PY - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
status = dict(line.split("\t", 1) for line in pathlib.Path("/tmp/device_check_status.tsv").read_text().splitlines())
rows = []
bench = out / "bench.json"
if bench.exists():
    for b in json.loads(bench.read_text())["benchmarks"]:
        e = b.get("extra_info", {})
        rows.append(dict(name=b["name"].removeprefix("test_"), ms=b["stats"]["median"] * 1e3,
                         gbps=e.get("gbps"), copy=e.get("copy_fraction"), vs_ref=e.get("speedup_vs_reference")))
json.dump(dict(status=status, bench=rows), open(out / "device_check.json", "w"), indent=1)
print("\n==== device_check summary ====")
for k in ("build", "tests_cuda", "cases", "memcheck", "racecheck", "bench", "tests_all"):
    print(f"{k:<11} {status.get(k, 'not run')}")
if rows:
    print(f"\n{'benchmark':<72} {'ms':>8} {'GB/s':>7} {'%copy':>6} {'x ref':>6}")
    for r in rows:
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"
        print(f"{r['name'][:72]:<72} {r['ms']:8.3f} {f(r['gbps'], '7.0f'):>7} "
              f"{f(r['copy'] and 100 * r['copy'], '5.1f'):>6} {f(r['vs_ref'], '6.1f'):>6}")
bad = [k for k, v in status.items() if not (v.startswith("ok") or v.startswith("rc=0"))]
print("\nRESULT:", "all stages passed" if not bad else "problems in " + ", ".join(sorted(bad)))
sys.exit(1 if bad else 0)
PY
