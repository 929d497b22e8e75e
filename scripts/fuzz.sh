#!/usr/bin/env bash
# Runs each cargo-fuzz target in fuzz/ for a bounded time and exits non-zero if any of
# them crashed (a panic, a failed invariant, an out-of-memory or a timeout).
#
#   scripts/fuzz.sh                    # every target, 20 s each
#   FUZZ_SECONDS=300 scripts/fuzz.sh   # longer
#   scripts/fuzz.sh lease_value        # some targets only
#
# Each target starts from the seeds committed in fuzz/corpus/<target>/ plus what earlier
# runs on this machine found (fuzz/target/corpus/<target>/, not committed). A crashing
# input is saved in fuzz/artifacts/<target>/; replay it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz -a <target> <file>
# A summary line per target (executions, corpus size, result) is printed at the end and
# kept in fuzz/target/fuzz-summary.txt. See docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-20}
all_targets=(config_json lease_value lease_proto cni_netconf cni_result subnet_env)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")

# -max_len: one byte over the parser's own bound where it has one, so the fuzzer also
# exercises the refusal of an oversized input (core/src/config.rs MAX_CONFIG_BYTES,
# core/src/lease.rs MAX_LEASE_VALUE_BYTES, node-agent/src/cni/config.rs
# MAX_STDIN_BYTES, node-agent/src/files.rs MAX_SUBNET_ENV_BYTES); lease_proto takes what
# the controller's gRPC limit lets through (controller/src/grpc.rs MAX_REQUEST_BYTES).
declare -A max_len=(
  [config_json]=32769
  [lease_value]=4097
  [lease_proto]=65536
  [cni_netconf]=1048577
  [cni_result]=1048577
  [subnet_env]=65537
)

for t in "${targets[@]}"; do
  if [ -z "${max_len[$t]:-}" ]; then
    echo "fuzz: unknown target $t (known: ${all_targets[*]})" >&2
    exit 2
  fi
done

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# cargo-fuzz passes nightly-only flags (-Zsanitizer=address, ...); this lets the stable
# toolchain accept them.
export RUSTC_BOOTSTRAP=1
# -a: debug assertions on, so an arithmetic overflow is a crash and not a wrapped value.
build_flags=(--fuzz-dir fuzz -a)

echo "fuzz: building ${targets[*]}"
for t in "${targets[@]}"; do
  cargo fuzz build "${build_flags[@]}" "$t"
done

mkdir -p fuzz/target
summary=fuzz/target/fuzz-summary.txt
: >"$summary"
failed=()
for t in "${targets[@]}"; do
  work=fuzz/target/corpus/$t
  log=fuzz/target/fuzz-$t.log
  mkdir -p "$work" "fuzz/artifacts/$t" "fuzz/corpus/$t"
  args=(
    -max_total_time="$seconds"
    -max_len="${max_len[$t]}"
    -timeout=10
    -rss_limit_mb=2048
    -print_final_stats=1
  )
  [ -f "fuzz/dicts/$t.dict" ] && args+=(-dict="fuzz/dicts/$t.dict")
  echo "fuzz: $t for ${seconds}s (max_len ${max_len[$t]})"
  # The first corpus directory receives new inputs; the committed seeds stay untouched.
  set +e
  cargo fuzz run "${build_flags[@]}" "$t" "$work" "fuzz/corpus/$t" -- "${args[@]}" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  corpus=$(find "$work" -type f | wc -l)
  if [ $rc -eq 0 ]; then
    result=ok
  else
    result="CRASH (exit $rc; see $log and fuzz/artifacts/$t/)"
    failed+=("$t")
    grep -E "panicked at|^==[0-9]+==ERROR|SUMMARY:|Test unit written to" "$log" | head -5 >&2 || true
  fi
  printf '%-12s %6ss  execs %-10s corpus %-6s %s\n' \
    "$t" "$seconds" "${execs:-?}" "$corpus" "$result" | tee -a "$summary"
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: no crash in ${#targets[@]} targets"
