#!/usr/bin/env bash
# attnedit's GPU check: one prepared command for an H100/H200, under 8 minutes, one Markdown report.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run    # anywhere: what it would run, with each step's time limit
#   bash benchmarks/gpu_check.sh --out DIR    # where the report goes (default benchmarks/results)
#
# Steps (each under its own time limit; a failed step is reported and the next one still runs):
#   1. the machine: nvidia-smi, Python, torch, triton, diffusers versions;
#   2. the kernel tests on CUDA (tests/test_kernels.py with TRITON_INTERPRET=0: compiled kernels);
#   3. the conformance matrix on CUDA with the default "auto" backend (tests/test_conformance.py,
#      ATTNEDIT_TEST_DEVICE=cuda), which takes the Triton kernels wherever they serve;
#   4. the quick rows of benchmarks/kernels.py (SD1.5 512 px and FLUX 1024 px shapes);
#   5. the quick rows of benchmarks/speed.py (SD1.5 512 px and FLUX 1024 px, stock vs attnedit).
# The report is benchmarks/results/gpu-check-<device>-<date>.md; the kernel benchmark also writes its
# own table there. diffusers is not on the device image: carry its wheel in .whl/ (pip download
# diffusers==0.42.1 --no-deps -d .whl here; the device tool's `carry: [".whl"]`), installed with --no-index.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=benchmarks/results
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) shift; OUT=${1:?--out needs a folder} ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (use --dry-run, --out DIR, --help)" >&2; exit 2 ;;
    esac
    shift
done

PY=${PYTHON:-python3}
# name | time limit (s) | command
STEPS=(
    "machine|30|nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY -c 'import sys, torch, triton, diffusers; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__, diffusers.__version__)'"
    "kernel tests on CUDA|150|TRITON_INTERPRET=0 $PY -m pytest -q -p no:cacheprovider -x tests/test_kernels.py"
    "conformance matrix on CUDA (auto backend)|150|TRITON_INTERPRET=0 ATTNEDIT_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider tests/test_conformance.py"
    "kernels benchmark, quick rows|60|TRITON_INTERPRET=0 $PY benchmarks/kernels.py --filter 'SD1.5 512|FLUX 1024' --rep 10 --warmup 3"
    "speed benchmark, quick rows|60|TRITON_INTERPRET=0 $PY benchmarks/speed.py --archs sd15 flux --sizes 512 --flux-sizes 1024 --repeats 2"
)

if [ "$DRY" = 1 ]; then
    echo "gpu_check.sh would run, in $(pwd), writing $OUT/gpu-check-<device>-<date>.md:"
    total=0
    for step in "${STEPS[@]}"; do
        IFS='|' read -r name limit cmd <<<"$step"
        cmd=${step#*|*|}
        total=$((total + limit))
        printf '  - %s (at most %ss): %s\n' "$name" "$limit" "$cmd"
    done
    echo "  at most ${total}s in all"
    exit 0
fi

if ! $PY -c "import diffusers" 2>/dev/null; then
    if [ -d .whl ]; then
        $PY -m pip install -q --no-index --find-links .whl diffusers || { echo "cannot install diffusers from .whl" >&2; exit 2; }
    else
        echo "diffusers is missing and no .whl folder was carried (see the header of this script)" >&2
        exit 2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
device=${device:-no-gpu}
slug=$(echo "$device" | tr -cs 'A-Za-z0-9' '-' | sed 's/^-//; s/-$//' | tr 'A-Z' 'a-z')
report="$OUT/gpu-check-$slug-$(date +%F).md"
{
    echo "# attnedit GPU check on $device, $(date +%F)"
    echo
    echo "Command: \`bash benchmarks/gpu_check.sh\` (commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))."
    echo
} >"$report"

failed=0
for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit _ <<<"$step"
    cmd=${step#*|*|}
    start=$(date +%s)
    output=$(timeout "$limit" bash -c "$cmd" 2>&1)
    status=$?
    seconds=$(( $(date +%s) - start ))
    verdict="ok"
    [ $status -eq 124 ] && verdict="timed out after ${limit}s"
    [ $status -ne 0 ] && [ $status -ne 124 ] && verdict="failed (exit $status)"
    [ $status -ne 0 ] && failed=$((failed + 1))
    echo "== $name: $verdict (${seconds}s)"
    {
        echo "## $name: $verdict (${seconds}s)"
        echo
        echo "\`$cmd\`"
        echo
        echo '```'
        echo "$output" | tail -n 60
        echo '```'
        echo
    } >>"$report"
done
echo "report: $report"
[ $failed -eq 0 ]
