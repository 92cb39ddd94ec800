#!/usr/bin/env bash
# tierkv demo with several block sizes, alternating, each run on a fresh store: does the block
# size change one agent turn's restore from cold SSD? (docs/benchmarks.md, "Choosing a block size")
#
#   bash bench/demo_block_sizes.sh OUT_DIR RUNS BLOCK_TOKENS... [-- extra tierkv demo options]
#   bash bench/demo_block_sizes.sh bench/results/block_size 3 256 1024
#
# PYTHON: the interpreter that has tierkv (default: python on the PATH).
# Writes OUT_DIR/demo_<block tokens>_run<i>.json: tierkv demo --json's object for each run.
set -euo pipefail
py=${PYTHON:-python}
out=$1 runs=$2
shift 2
sizes=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do sizes+=("$1"); shift; done
[ $# -gt 0 ] && shift
mkdir -p "$out"
store=$(mktemp -d "${TMPDIR:-/var/tmp}/tierkv-demo-blocks-XXXXXX")
trap 'rm -rf "$store"' EXIT
for i in $(seq 1 "$runs"); do
  for bt in "${sizes[@]}"; do
    rm -rf "$store/s"
    "$py" -m tierkv.cli demo --json --block-tokens "$bt" --store "$store/s" "$@" | tail -1 > "$out/demo_${bt}_run$i.json"
    echo "run $i, $bt-token blocks: $("$py" -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"restore TTFT {r['restore_ttft_s']*1e3:.1f} ms, tokens identical {r['tokens_identical']}\")" "$out/demo_${bt}_run$i.json")"
  done
done
