# tools/gpu/lib.sh — the common start of the tools/gpu/*.sh scripts (sourced, never run).
# gpu_setup NAME BUDGET sets OUT (default /tmp/strata-NAME-out, created), C (.devcarry, from
# prepare.sh), S (its strata), T_START, BUDGET (seconds; the caller's value wins), the library
# path (the carried .so files, CUDA's, then cuBLAS and NCCL from the Python wheels where they are
# installed: strata dlopens libnccl) and NCCL_NVLS_ENABLE=0 (NVLink multicast stays off on the
# device machines). left prints the seconds of BUDGET not yet spent.

# gpu_pylib PKG: the lib folder of the Python package nvidia.PKG, or nothing
gpu_pylib() { python3 -c "import nvidia.$1, os; print(os.path.join(list(nvidia.$1.__path__)[0], 'lib'))" 2>/dev/null || true; }

gpu_setup() {
  OUT=${OUT:-/tmp/strata-$1-out}
  mkdir -p "$OUT"
  C=.devcarry
  S=$C/bin/strata
  T_START=$(date +%s)
  BUDGET=${BUDGET:-$2}
  local cublas nccl
  cublas=$(gpu_pylib cublas)
  nccl=$(gpu_pylib nccl)
  export LD_LIBRARY_PATH="$C/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib${cublas:+:$cublas}${nccl:+:$nccl}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export NCCL_NVLS_ENABLE=0
}

left() { echo $(( BUDGET - ($(date +%s) - T_START) )); }
