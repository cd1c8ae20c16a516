#!/usr/bin/env bash
# One command for a fresh GPU machine (torch, triton, nvcc, ninja, pytest, pytest-benchmark
# preinstalled; no network): build the CUDA extension, time the DTN training step first (the
# headline), run the GPU tests, measure the embedding bag's bandwidth, time every op and model (fp32
# under the recorded matmul policy, and bf16 autocast; providers interleaved; every provider's output
# and gradients checked against eager first), write the report. It always comes back with what it
# measured.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        (default results/bench-gpu)
#
# Everything lands in OUT_DIR (the last line printed is the tar command that packs it into one
# file). Stages, each under its own `timeout`, each recorded in OUT_DIR/stages.jsonl (stage,
# status ok / failed / timeout / skipped, seconds, budget, reason) before the next starts; a
# stage that fails or times out is recorded and the suite goes on; a test stage that selects no
# test (pytest exit 5) is failed. Budgets (seconds, planned for a 16-core H100/H200 with cold
# caches; DTN_SUITE_BUDGET_S, default 540, bounds the whole suite and every stage is cut to what is
# left of it, keeping 20 s for the report):
#
#   env           30  versions, GPU, packages each stage needs (about 10 s;       -> env.json
#                     only a failure, not a timeout, ends the run)
#   build        180  dtn_kernels._C with CUDA for this card; ninja, all sources   -> build.log
#                     in parallel (no ninja: says so, builds serially)
#   compile-warm 170  WHILE the build runs: torch.compile of the reference DTN    -> compile_warm.json
#                     at the headline's 4 shapes, into torch's on-disk caches
#                     (benchmarks/compile_warm.py; the reference needs no extension)
#   bench-headline 150  the DTN training step, paper config, B = 2048 and 4096,   -> cases.jsonl, results_headline.json
#                     bf16 and TF32: eager, compile (fullgraph), fused, grouped,
#                     grouped + CUDA graph. Starts by 30 + 180 = 210 s at the
#                     latest, so it ends by 360 s: 6 minutes of a fresh machine
#   tests-triton  75  GPU tests of tests/test_triton_*.py                         -> tests-triton.{log,xml}
#   tests-gpu     45  the other GPU tests (embedding bag CUDA kernels, CUDA       -> tests-gpu.{log,xml}
#                     graphs, convergence, ...)
#   bandwidth     15  embedding bag forward GB/s against the copy bandwidth       -> bandwidth.json
#   bench-core   30+  every op's forward + backward at B = 2048 (bf16, then       -> cases.jsonl, results_core.json
#                     fp32), all providers. Gets what is left but 20 s
#   bench-rest   20+  the other modes, batch sizes and models, while time lasts   -> cases.jsonl, results_rest.json
#   report        20  report.md (+ speedups.png with matplotlib), history line    -> report.md, history.jsonl
#   planned: 30 + 180 (warm-up alongside) + 150 + 75 + 45 + 15 + 30 + 20 + 20 = 565 s at the worst;
#   the 540 s budget cuts bench-core first. A build that takes 90 s leaves bench-core 120 s.
#
# A failed build skips what needs the extension (bandwidth; the embedding bag's fused providers,
# with the reason) while the Triton tests and benchmarks still run. GPU tests are selected by
# rule, not by list (benchmarks/gpu_test_selection.py): every test under tests/ marked
# requires_cuda or skipped, without a GPU, by a skipif whose reason names CUDA or a GPU (in the
# files that mention either word; tests/test_cuda_compile.py runs in the CPU check instead).
# Benchmarks: the DTN training step first (bench-headline), then every benchmarks/bench_*.py.
#
# DTN_SUITE_CHECK=1 runs every stage on a machine without a GPU, to check the script (CI does):
# the CUDA sources compiled for sm_90 with nvcc (compile only: nothing runs), the CPU extension
# built with ninja, the GPU test selection collected (it skips on CPU), the bandwidth script and a
# smoke-sized suite (both precisions; torch.compile for the softmax gate and the embedding bag
# only, as compiling on CPU costs up to a minute an op) on CPU, and the report. Its exit code is 0
# only if every stage is ok. Its test and bandwidth stages keep their earlier budgets (tests-triton
# 150 s, tests-gpu 75 s, bandwidth 25 s): on CPU they do little, but a loaded CI machine is slow. Measured on a 2-core machine shared with other work (load 4-5): 380 s
# from a fresh build folder and an empty inductor cache, 111 s warm; its budget is 600 s (build
# 360 s) so that a loaded CI machine does not fail it for time.
#
# Settings: PYTHON (interpreter, default python3), DTN_COMMIT (recorded commit; default from
# git), DTN_SUITE_TAR=FILE (also write the tarball), DTN_SUITE_ONLY=stage,stage
# (run only these; the others are recorded as skipped), DTN_SUITE_TEST_K=EXPR (pytest -k for the
# test stages), DTN_STAGE_BUDGET_<STAGE>=S (override a
# budget; STAGE upper-case, '-' as '_'), DTN_BENCH_* (see docs/benchmarks.md).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
CHECK="${DTN_SUITE_CHECK:-0}"
OUT="${1:-results/bench-gpu}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
# the CPU check's budgets leave room for a loaded machine (CI shared with other work): no device
# lease is at stake there
if [ "$CHECK" = 1 ]; then BUDGET="${DTN_SUITE_BUDGET_S:-600}"; else BUDGET="${DTN_SUITE_BUDGET_S:-540}"; fi
REPORT_RESERVE=20
REST_RESERVE=20  # bench-core leaves this much for bench-rest when it takes the earlier stages' slack
start=$(date +%s)
DEADLINE=$(( start + BUDGET ))
STAGES="$OUT/stages.jsonl"
# a previous run's files in the same folder would mix into this one's report
rm -f "$OUT"/stages.jsonl "$OUT"/cases.jsonl "$OUT"/results_*.json "$OUT"/*.log "$OUT"/*.xml "$OUT"/bandwidth.json \
      "$OUT"/env.json "$OUT"/report.md "$OUT"/speedups.png "$OUT"/history.png "$OUT"/compile_warm.json
COMMIT="${DTN_COMMIT:-$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
if [ -z "${DTN_COMMIT:-}" ] && [ "$COMMIT" != unknown ] && [ -n "$(git -C "$ROOT" status --porcelain -uno 2>/dev/null)" ]; then
  COMMIT="$COMMIT+dirty"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DTN_COMMIT="$COMMIT"
export PY OUT ROOT CHECK
if [ "$CHECK" = 1 ]; then
  unset TRITON_INTERPRET DTN_TRITON_ON_CPU  # nothing runs Triton kernels here; tests pick their own setting
else
  export TRITON_INTERPRET=0  # tests/triton_env.py would otherwise turn the interpreter on
fi

say() { echo "[gpu_suite $(( $(date +%s) - start ))s] $*" | tee -a "$OUT/suite.log"; }

json_str() {  # a JSON string literal of $1
  local s
  s=$(printf '%s' "$1" | tr -d '\000-\010\013\014\016-\037' | tr '\n\t\r' '   ')
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

record_stage() {  # NAME STATUS SECONDS BUDGET REASON [LOG]
  printf '{"stage": %s, "status": %s, "seconds": %s, "budget_s": %s, "reason": %s, "log": %s, "at_s": %s}\n' \
    "$(json_str "$1")" "$(json_str "$2")" "$3" "$4" "$(json_str "$5")" "$(json_str "${6:-}")" \
    "$(( $(date +%s) - start ))" >> "$STAGES"
  say "stage $1: $2 (${3}s)${5:+ - $5}"
}

budget_of() {  # NAME DEFAULT: the stage's budget, DTN_STAGE_BUDGET_<NAME> overriding
  local var="DTN_STAGE_BUDGET_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  echo "${!var:-$2}"
}

selected() {  # is stage $1 selected by DTN_SUITE_ONLY?
  [ -z "${DTN_SUITE_ONLY:-}" ] && return 0
  case ",$DTN_SUITE_ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac
}

missing_modules() {  # the Python modules among "$@" that this interpreter cannot import
  "$PY" - "$@" <<'PYEOF' 2>/dev/null || echo "$@"
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PYEOF
}

log_summary() {  # the most telling line of a stage's log: pytest's summary, else its last line
  local log=$1 line errs
  [ -f "$log" ] || return 0
  line=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|errors?|deselected)|^(=+ )?no tests ran' "$log" | tail -1)
  errs=$(grep -oE '(ModuleNotFoundError|ImportError): [^"]*' "$log" | sort -u | head -3 | tr '\n' ';')
  [ -n "$line" ] || line=$(grep -v '^\s*$' "$log" | tail -1)
  printf '%s' "${line:0:300}${errs:+ [$errs]}"
}

STAGE_NOTE=""
# run_stage NAME BUDGET LOG CMD...: runs CMD (an exported function or a command) under
# `timeout min(BUDGET, time left - report reserve)`, records the stage, returns CMD's status.
run_stage() {
  local name=$1 budget=$2 log=$3; shift 3
  local note=$STAGE_NOTE; STAGE_NOTE=""
  if ! selected "$name"; then record_stage "$name" skipped 0 "$budget" "not in DTN_SUITE_ONLY=$DTN_SUITE_ONLY"; return 3; fi
  local now left limit t0 rc status reason secs
  now=$(date +%s)
  if [ "$name" = report ]; then left=$(( DEADLINE + REPORT_RESERVE - now )); [ "$left" -lt 15 ] && left=15
  else left=$(( DEADLINE - REPORT_RESERVE - now )); fi
  limit=$budget
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$left" -lt 5 ]; then
    record_stage "$name" skipped 0 "$budget" "no time left in the suite's ${BUDGET}s budget${note:+; $note}" "$log"
    return 3
  fi
  say "stage $name: budget ${budget}s, limit ${limit}s${note:+ ($note)}"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  case $rc in
    0) status=ok; reason="" ;;
    5) status=failed; reason="no tests selected (pytest exit 5)" ;;  # a stage that tests nothing is no pass
    124|137) status=timeout; reason="timed out after ${limit}s" ;;
    *) status=failed; reason="exit code $rc" ;;
  esac
  local summary; summary=$(log_summary "$log")
  reason="${reason:+$reason; }${summary}${note:+; $note}"
  record_stage "$name" "$status" "$secs" "$budget" "$reason" "$(basename "$log")"
  return $rc
}

# ---------------------------------------------------------------- stage commands (exported: run under timeout)

stage_env() {
  "$PY" - "$OUT/env.json" <<'PYEOF'
import importlib.util, json, os, platform, shutil, subprocess, sys

def version(cmd, marker=None):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    picked = [line for line in out if marker in line] if marker else out
    return picked[-1].strip() if picked else None

mods = ["torch", "triton", "numpy", "pytest", "pytest_benchmark", "hypothesis", "yaml", "pandas", "sklearn",
        "matplotlib", "tqdm", "setuptools"]
pkgs = {}
for m in mods:
    if importlib.util.find_spec(m) is None:
        pkgs[m] = None
        continue
    try:
        pkgs[m] = str(getattr(__import__(m), "__version__", "present"))
    except Exception as exc:  # noqa: BLE001 -- a broken package is as good as missing
        pkgs[m] = None
        print(f"{m}: import failed ({exc})")
env = {"python": platform.python_version(), "nproc": os.cpu_count(), "packages": pkgs,
       "nvcc": version(["nvcc", "--version"], "release"), "ninja": version(["ninja", "--version"]),
       "commit": os.environ.get("DTN_COMMIT"), "check": os.environ.get("CHECK") == "1"}
try:
    import torch
    env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
               fp32_matmul_default=torch.get_float32_matmul_precision())
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0), capability="%d.%d" % torch.cuda.get_device_capability(0),
                   gpu_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
except Exception as exc:  # noqa: BLE001
    env["torch_error"] = str(exc)
try:
    env["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except (OSError, StopIteration):
    env["cpu"] = platform.processor()
with open(sys.argv[1], "w") as fh:
    json.dump(env, fh, indent=1)
print(json.dumps(env, indent=1))
missing = [m for m, v in pkgs.items() if v is None]
print("needed per stage: build torch, setuptools (+ nvcc, ninja); tests pytest (+ hypothesis, which the GPU "
      "test files import); benchmarks pytest, pytest_benchmark (+ yaml for bench_model.py); report nothing "
      "(matplotlib only for the PNG)")
if "torch_error" in env or pkgs["torch"] is None:
    sys.exit("torch does not import: nothing can run")
if os.environ.get("CHECK") != "1" and not env.get("cuda_available"):
    sys.exit("no CUDA device visible to torch (on a machine without a GPU use DTN_SUITE_CHECK=1)")
nvcc = env["nvcc"].split(",")[-1].strip() if env["nvcc"] else "none"  # "V13.0.88"
print(f"torch {env['torch']} (CUDA {env['torch_cuda']}) · GPU {env.get('gpu', 'none')} · nvcc {nvcc} · "
      f"ninja {env['ninja'] or 'none'} · missing packages: {', '.join(missing) or 'none'}")
PYEOF
}

stage_build_gpu() {  # the CUDA extension for this card, all sources at once under ninja
  local cap
  cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))") || return 1
  echo "building dtn_kernels._C with CUDA for sm_${cap/./} (DTN_USE_NINJA=$DTN_USE_NINJA MAX_JOBS=$(nproc))"
  DTN_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$cap" MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace || return 1
  "$PY" -c "import dtn_kernels as k; assert k.HAS_CUDA_EXT, k.C_EXT_ERROR; print('HAS_CUDA_EXT', k.HAS_CUDA_EXT)"
}

stage_build_check() {  # nvcc compile-only of csrc/cuda for sm_90 (a CPU torch has nothing to link) + the CPU build
  "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda_compile.py > "$OUT/build-nvcc.log" 2>&1 &
  local nvcc_pid=$! rc=0
  DTN_SKIP_CUDA=1 MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace || rc=1
  "$PY" -c "import dtn_kernels as k; assert k.HAS_C_EXT, k.C_EXT_ERROR; print('HAS_C_EXT', k.HAS_C_EXT)" || rc=1
  wait "$nvcc_pid" || rc=1
  echo "--- nvcc compile-only check for sm_90 (tests/test_cuda_compile.py)"
  cat "$OUT/build-nvcc.log"
  if grep -q "skipped" "$OUT/build-nvcc.log"; then echo "the nvcc check was skipped: nvcc not found"; rc=1; fi
  return $rc
}

stage_tests() {  # WHICH (triton | gpu): the GPU tests, selected by rule (see the header)
  local files
  if [ "$1" = triton ]; then
    files=$(ls tests/test_triton_*.py 2>/dev/null)
  else  # a file with a GPU test mentions cuda or gpu; the others are not even imported
    files=$(grep -l -i -E 'cuda|gpu' tests/test_*.py | grep -v -E '/test_triton_[^/]*\.py$|/test_cuda_compile\.py$')
  fi
  [ -n "$files" ] || { echo "no test files for $1"; return 5; }
  echo "files:" $files
  # benchmarks/gpu_test_selection.py keeps the tests marked as needing a GPU
  # shellcheck disable=SC2086
  PYTHONPATH="$ROOT/benchmarks:$PYTHONPATH" "$PY" -m pytest -q -p no:cacheprovider -p gpu_test_selection -rs \
    --continue-on-collection-errors --junitxml="$OUT/tests-$1.xml" ${DTN_SUITE_TEST_K:+-k "$DTN_SUITE_TEST_K"} $files
}

stage_bandwidth() {
  if [ "$CHECK" = 1 ]; then
    DTN_BENCH_DEVICE=cpu "$PY" benchmarks/embedding_bag_bandwidth.py --smoke --out "$OUT/bandwidth.json"
  else
    "$PY" benchmarks/embedding_bag_bandwidth.py --out "$OUT/bandwidth.json"
  fi
}

stage_bench() {  # PART (headline | core | rest) DEADLINE
  export DTN_BENCH_SUBSET=$1 DTN_BENCH_DEADLINE=$2 DTN_BENCH_LOG="$OUT/cases.jsonl"
  local files=$BENCH_FILES
  if [ "$1" = headline ]; then  # the DTN training step; its five providers unless DTN_BENCH_PROVIDERS says otherwise
    files=benchmarks/bench_model.py
    export DTN_BENCH_PROVIDERS="${DTN_BENCH_PROVIDERS:-eager,compile,fused,grouped,grouped_graph}"
    # the compile cache was warmed alongside the build: a model compile is then a cache load
    [ -s "$OUT/compile_warm.json" ] && grep -q '"seconds"' "$OUT/compile_warm.json" \
      && export DTN_BENCH_MODEL_COMPILE_S="${DTN_BENCH_MODEL_COMPILE_S:-30}"
  fi
  # shellcheck disable=SC2086
  "$PY" -m pytest $files -k "not test_embedding_bag_fwd_bwd" --benchmark-only -q -p no:cacheprovider -rs \
    --benchmark-json="$OUT/results_$1.json" --benchmark-columns=median,iqr,rounds
}

stage_compile_warm() {  # the headline's model compiles into torch's on-disk caches, while the extension builds
  "$PY" benchmarks/compile_warm.py --out "$OUT/compile_warm.json"
}

stage_report() {
  local hist="$ROOT/benchmarks/results/history.jsonl"
  [ "$CHECK" = 1 ] && hist="$OUT/history.jsonl"  # a CPU check is no GPU history
  "$PY" benchmarks/report.py "$OUT/cases.jsonl" --out "$OUT" --stages "$STAGES" --env "$OUT/env.json" \
    --history "$hist" --commit "$COMMIT" --command "bash benchmarks/gpu_suite.sh $OUT" || return $?
  [ "$CHECK" = 1 ] || cp "$hist" "$OUT/history.jsonl"
  echo "report written: $OUT/report.md"
}

export -f stage_env stage_build_gpu stage_build_check stage_tests stage_bandwidth stage_bench stage_report \
  stage_compile_warm
export STAGES COMMIT

# ---------------------------------------------------------------- the run

say "gpu_suite: $([ "$CHECK" = 1 ] && echo 'DTN_SUITE_CHECK=1, a CPU check of the script (no GPU numbers)' || echo 'GPU run') ·" \
    "budget ${BUDGET}s · out $OUT · commit $COMMIT"
run_stage env "$(budget_of env 30)" "$OUT/env.log" bash -c stage_env
env_rc=$?
tail -4 "$OUT/env.log" | tee -a "$OUT/suite.log"

# benchmark settings (every bench stage and the compile warm-up)
if [ "$CHECK" = 1 ]; then  # compile on CPU costs 5-60 s an op: the two cheapest show the compile path works
  export DTN_BENCH_DEVICE=cpu DTN_BENCH_PRESET=smoke DTN_BENCH_THREADS=1
  export DTN_BENCH_COMPILE_OPS="${DTN_BENCH_COMPILE_OPS:-softmax_gate,embedding_bag}"
else
  export DTN_BENCH_DEVICE=cuda DTN_BENCH_PRESET="${DTN_BENCH_PRESET:-full}"
fi
BENCH_FILES=$(ls benchmarks/bench_*.py | grep -v '/bench_model\.py$' | tr '\n' ' ')
bench_missing=$(missing_modules pytest pytest_benchmark)
bench_note=""
model_ok=0
if [ -f benchmarks/bench_model.py ]; then
  if [ -z "$(missing_modules yaml)" ]; then model_ok=1
  else bench_note="bench_model.py left out: PyYAML is missing (dtn.config imports it)"; fi
fi
export BENCH_FILES

# bench_stage PART BUDGET: a benchmark stage; the harness stops starting compiles and groups 10 s
# before the stage's timeout
bench_stage() {
  local part=$1 b=$2 lim
  if [ -n "$bench_missing" ]; then record_stage "bench-$part" skipped 0 0 "missing Python packages: $bench_missing"; return 3; fi
  lim=$(( DEADLINE - REPORT_RESERVE - $(date +%s) )); [ "$b" -lt "$lim" ] && lim=$b
  STAGE_NOTE="$bench_note"
  run_stage "bench-$part" "$b" "$OUT/bench-$part.log" bash -c "stage_bench $part $(( $(date +%s) + lim - 10 ))"
}

# a failed env stage (no torch, no GPU) ends the run; a slow one (timeout) does not
if [ "$env_rc" != 0 ] && [ "$env_rc" != 124 ] && [ "$env_rc" != 137 ] && selected env; then
  for s in build compile-warm bench-headline tests-triton tests-gpu bandwidth bench-core bench-rest; do
    record_stage "$s" skipped 0 0 "the env stage failed: $(tail -1 "$OUT/env.log")"
  done
else
  # ---- build (in the background) alongside the compile warm-up of the headline's reference model
  if ninja --version > /dev/null 2>&1; then
    export DTN_USE_NINJA=1
    STAGE_NOTE="ninja $(ninja --version), $(nproc) jobs"
  else
    export DTN_USE_NINJA=0
    STAGE_NOTE="ninja NOT FOUND: the sources compile one after another (install ninja for a parallel build)"
    say "WARNING: $STAGE_NOTE"
  fi
  if [ "$CHECK" = 1 ]; then build_fn=stage_build_check; else build_fn=stage_build_gpu
    [ -z "$(command -v nvcc)" ] && STAGE_NOTE="$STAGE_NOTE; nvcc NOT FOUND: no CUDA build possible"
  fi
  BUILD_BUDGET=$(budget_of build "$([ "$CHECK" = 1 ] && echo 360 || echo 180)")
  run_stage build "$BUILD_BUDGET" "$OUT/build.log" bash -c "$build_fn" &
  build_pid=$!
  STAGE_NOTE=""  # the background stage took its copy
  if [ "$model_ok" = 1 ]; then
    run_stage compile-warm "$(budget_of compile-warm $(( BUILD_BUDGET - 10 )))" "$OUT/compile-warm.log" bash -c stage_compile_warm
  else
    record_stage compile-warm skipped 0 0 "${bench_note:-benchmarks/bench_model.py is not there}"
  fi
  wait "$build_pid"
  build_rc=$?
  [ "$build_rc" = 0 ] || { say "build did not succeed (see build.log); what needs the extension is skipped"; tail -20 "$OUT/build.log" >> "$OUT/suite.log"; }

  # ---- the headline: the DTN training step, eager / compile / fused / grouped / grouped + CUDA graph
  if [ "$model_ok" = 1 ]; then bench_stage headline "$(budget_of bench-headline 150)"
  else record_stage bench-headline skipped 0 0 "${bench_note:-benchmarks/bench_model.py is not there}"; fi

  # ---- GPU tests, selected by rule (see the header)
  test_missing=$(missing_modules pytest hypothesis)
  [ -n "$test_missing" ] && STAGE_NOTE="missing: $test_missing (files importing it cannot be collected)"
  run_stage tests-triton "$(budget_of tests-triton "$([ "$CHECK" = 1 ] && echo 150 || echo 75)")" "$OUT/tests-triton.log" \
    bash -c "stage_tests triton"
  [ -n "$test_missing" ] && STAGE_NOTE="missing: $test_missing (files importing it cannot be collected)"
  run_stage tests-gpu "$(budget_of tests-gpu "$([ "$CHECK" = 1 ] && echo 75 || echo 45)")" "$OUT/tests-gpu.log" \
    bash -c "stage_tests gpu"

  if [ "$build_rc" = 0 ] || [ "$CHECK" = 1 ]; then
    run_stage bandwidth "$(budget_of bandwidth "$([ "$CHECK" = 1 ] && echo 25 || echo 15)")" "$OUT/bandwidth.log" \
      bash -c stage_bandwidth
  else
    record_stage bandwidth skipped 0 "$(budget_of bandwidth 15)" "the CUDA extension did not build (see build.log)"
  fi

  # ---- per-op groups (core: forward + backward at B = 2048), then the rest (other models included)
  [ "$model_ok" = 1 ] && BENCH_FILES="$BENCH_FILES benchmarks/bench_model.py"
  export BENCH_FILES
  left=$(( DEADLINE - REPORT_RESERVE - $(date +%s) ))
  b=$(( left - REST_RESERVE )); [ "$b" -lt 30 ] && b=30  # core: what is left but REST_RESERVE for the rest
  bench_stage core "$(budget_of bench-core "$b")"
  bench_stage rest "$(budget_of bench-rest $(( DEADLINE - REPORT_RESERVE - $(date +%s) )))"
fi

run_stage report "$(budget_of report 20)" "$OUT/report.log" bash -c stage_report
tail -n +1 "$OUT/report.log" | grep -v '^$' | head -60 >> "$OUT/suite.log"

# ---- summary, exit code, the tar command
total=$(( $(date +%s) - start ))
say "stages:"
"$PY" - "$STAGES" <<'PYEOF' 2>/dev/null | tee -a "$OUT/suite.log" || cat "$STAGES"
import json, sys
for line in open(sys.argv[1]):
    s = json.loads(line)
    print(f"  {s['stage']:<13}{s['status']:<9}{s['seconds']:>5}s / {s['budget_s']:>4}s  {s['reason'][:150]}")
PYEOF
bad=$(grep -c -E '"status": "(failed|timeout)"' "$STAGES")
if [ "$CHECK" = 1 ]; then bad=$(grep -c -v '"status": "ok"' "$STAGES"); fi
say "done in ${total}s (budget ${BUDGET}s); stages not ok: $bad; everything is in $OUT"
parent=$(dirname "$OUT"); name=$(basename "$OUT")
if [ -n "${DTN_SUITE_TAR:-}" ]; then
  tar -czf "$DTN_SUITE_TAR" -C "$parent" "$name" && say "packed into $DTN_SUITE_TAR"
fi
echo "To bring it back as one file: tar -czf \"\$OUT/$name.tar.gz\" -C \"$parent\" \"$name\""
[ "$bad" = 0 ]
