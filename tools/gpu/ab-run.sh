#!/usr/bin/env bash
# tools/gpu/ab-run.sh — A/B benchmarks of CUDA switches on the GPU machine, from the repo root
# with .devcarry/ carried (tools/gpu/prepare.sh). For every model of MODELS and every config of
# CONFIGS (NAME or NAME:VAR=VAL[,VAR=VAL...]; the environment a bench runs under), runs
#   strata bench --synthetic MODEL --device cuda FLAGS
# alternating configs per model (ROUNDS times), and prints a table of tok/s and p50 per model and
# config. A model may carry its own flags: MODEL@FLAG,VALUE,... (commas for spaces), e.g.
# minimax-m2.5:q4g64@--context,4096,--prompt,256. Optional first phases: PARITY=1 (cuda-parity), GOLDEN=1 (eval-golden --device cuda on
# every fixture), both under the first config's environment and each config's if ALLCFG=1;
# NSYS=MODEL:CONFIG (an nsys timeline of that bench: per-kernel times inside the decode graph).
# Every phase is bounded; everything goes under $OUT.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
gpu_setup ab 420
MODELS=${MODELS:-"qwen3-8b:q4g64 qwen3-8b:bf16"}
CONFIGS=${CONFIGS:-"base:STRATA_CUDA_NO_PDL=1 pdl"}
ROUNDS=${ROUNDS:-1}
FLAGS=${FLAGS:-"--prompt 512 --gen 128"}
SUM="$OUT/ab-summary.md"
: > "$SUM"

# cfg_env CONFIG: prints the VAR=VAL words of a config
cfg_env() { case "$1" in *:*) echo "${1#*:}" | tr ',' ' ';; *) echo "";; esac; }
cfg_name() { echo "${1%%:*}"; }

# run_env CONFIG LIMIT LOG CMD...: CMD under the config's environment, bounded
run_env() {
  local cfg=$1 lim=$2 log=$3; shift 3
  local l; l=$(left)
  [ "$l" -lt 15 ] && { echo "(skipped: ${l}s left)" > "$log"; return 124; }
  [ "$lim" -gt "$l" ] && lim=$l
  # shellcheck disable=SC2046
  timeout "$lim" env $(cfg_env "$cfg") "$@" > "$log" 2>&1
}

first=${CONFIGS%% *}
pcfgs=$first
[ "${ALLCFG:-0}" = 1 ] && pcfgs=$CONFIGS
for cfg in $pcfgs; do
  n=$(cfg_name "$cfg")
  if [ "${PARITY:-0}" = 1 ]; then
    run_env "$cfg" 120 "$OUT/parity-$n.log" "$S" cuda-parity
    echo "| parity ($n) | rc $? | $(grep -E 'cases,' "$OUT/parity-$n.log" | tail -n 1) |" | tee -a "$SUM"
  fi
  if [ "${GOLDEN:-0}" = 1 ]; then
    fail=0; runs=0
    for d in "$C"/fixtures/models/*/; do
      for extra in "" "--batch 7"; do
        runs=$((runs + 1))
        # shellcheck disable=SC2086
        run_env "$cfg" 60 "$OUT/golden-$n-$(basename "$d")${extra:+-b7}.log" "$S" eval-golden "$d" --device cuda $extra ||
          { fail=$((fail + 1)); echo "FAILED: $d $extra ($n)" | tee -a "$SUM"; }
      done
    done
    echo "| golden ($n) | $((runs - fail)) of $runs passed |" | tee -a "$SUM"
  fi
done

echo "| model | config | round | tok/s | p50 ms | MBU | log |" >> "$SUM"
echo "|---|---|---|---|---|---|---|" >> "$SUM"
for spec in $MODELS; do
  m=${spec%%@*}; mflags=$FLAGS
  case "$spec" in *@*) mflags="$(echo "${spec#*@}" | tr ',' ' ') --gen 128";; esac
  for r in $(seq "$ROUNDS"); do
    for cfg in $CONFIGS; do
      n=$(cfg_name "$cfg")
      log="$OUT/bench-${m//:/-}-$n-r$r.log"
      # shellcheck disable=SC2086
      run_env "$cfg" 200 "$log" "$S" bench --synthetic "$m" --device cuda $mflags --out "$OUT/rep-${m//:/-}-$n-r$r"
      rc=$?
      tps=$(grep -oE '[0-9.]+ tok/s, MBU' "$log" | head -n 1 | cut -d' ' -f1)
      mbu=$(grep -oE 'MBU [0-9.]+' "$log" | head -n 1 | cut -d' ' -f2)
      p50=$(grep -oE 'Token Latency\*\* \(p50 / p90 / p99\) \| \*\*[0-9.]+' "$log" | grep -oE '[0-9.]+$')
      echo "| $m | $n | $r | ${tps:-rc $rc} | ${p50:--} | ${mbu:--} | $(basename "$log") |" | tee -a "$SUM"
    done
  done
done

# NSYS=MODEL:CONFIGNAME — kernel timeline of one bench (decode graph nodes traced)
if [ -n "${NSYS:-}" ] && command -v nsys > /dev/null && [ "$(left)" -gt 60 ]; then
  m=${NSYS%:*}; want=${NSYS##*:}; cfg=$first
  for c in $CONFIGS; do [ "$(cfg_name "$c")" = "$want" ] && cfg=$c; done
  rep="$OUT/nsys-${m//:/-}-$want"
  # shellcheck disable=SC2086
  run_env "$cfg" 150 "$OUT/nsys-run.log" nsys profile --cuda-graph-trace=node -t cuda -o "$rep" --force-overwrite true \
    "$S" bench --synthetic "$m" --device cuda --prompt 64 --gen 32 --out "$OUT/rep-nsys"
  run_env "$cfg" 90 "$OUT/nsys-kern.txt" nsys stats -r cuda_gpu_kern_sum -f csv "$rep.nsys-rep"
  run_env "$cfg" 90 "$OUT/nsys-trace.txt" nsys stats -r cuda_gpu_trace -f csv "$rep.nsys-rep"
  gzip -f "$OUT/nsys-trace.txt"
  echo "nsys: $(wc -l < "$OUT/nsys-kern.txt") lines in nsys-kern.txt, trace in nsys-trace.txt.gz" | tee -a "$SUM"
  rm -f "$rep.sqlite"
elif [ -n "${NSYS:-}" ]; then
  echo "nsys: not run ($(command -v nsys > /dev/null && echo "time left $(left)s" || echo 'no nsys on PATH'))" | tee -a "$SUM"
fi

# the logs in one archive (the device tool returns a limited number of files)
( cd "$OUT" && find . -maxdepth 1 -type f ! -name ab-summary.md ! -name '*.tgz' -print0 |
  tar --null -czf ab-logs.tgz -T - --remove-files ) 2>/dev/null
find "$OUT" -mindepth 1 -maxdepth 1 -type d -name 'rep-*' -exec rm -rf {} +
echo
echo "== summary (total $(( $(date +%s) - T_START )) s)"
cat "$SUM"
