#!/usr/bin/env bash
# One short session on a GPU machine: the machine described, the CUDA tests, the whole suite with
# CUDA present (the engine then keeps its device tier in GPU memory and its host tier pinned),
# and the reload benchmark with its GPU rows. Everything lands in $OUT (default /tmp/tierkv-gpu).
#
#   bash bench/gpu_run.sh [SECONDS]     # stop starting new steps after SECONDS (default 480)
#
# Where pip cannot reach an index, put wheels of lmdb, zstandard and crc32c in .whl/ first (and
# of blosc2 with its dependencies for bench/compressed_ceiling.py, which is skipped without it); the
# bf16 bench KV (bench-kv-smollm2-2048-bf16.npy, made by `tierkv bench reload --dtype bf16` on a
# machine with the model) may be carried as .gpu/bench-kv-smollm2-2048-bf16.npy.zst.
set -u
START=$(date +%s)
BUDGET=${1:-480}
OUT=${OUT:-/tmp/tierkv-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
LOGS=/tmp/tierkv-gpu-logs  # per step; all appended to $OUT/steps.log (the device tool returns 8 files at most)
mkdir -p "$LOGS"
step() {  # step NAME SECONDS CMD...: run CMD with at most SECONDS (and what is left), log to $OUT/steps.log
    local name=$1 want=$2; shift 2
    local have; have=$(left)
    (( have < 20 )) && { echo "== $name: skipped, ${have}s left" | tee -a "$OUT/steps.txt"; return; }
    (( want > have )) && want=$have
    local t0; t0=$(date +%s)
    timeout "$want" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/steps.txt"
    { echo "===== $name (rc=$rc)"; cat "$LOGS/$name.log"; } >> "$OUT/steps.log"
    tail -n 25 "$LOGS/$name.log"
}

{
    date -u; uname -r; nproc; free -g; python3 -V
    nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv
    lsblk -o NAME,SIZE,ROTA,TYPE,MOUNTPOINT; df -h /tmp "$PWD"
    for q in /sys/block/*/queue; do echo "$q max_sectors_kb=$(cat $q/max_sectors_kb) max_segments=$(cat $q/max_segments 2>/dev/null)"; done
    cat /sys/kernel/mm/transparent_hugepage/enabled
} > "$OUT/machine.txt" 2>&1

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c 'import torch, tierkv, lmdb, zstandard; print("torch", torch.__version__, "cuda", torch.version.cuda,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' | tee -a "$OUT/machine.txt"

KV=/tmp/tierkv-cache
mkdir -p "$KV"
if [ -f .gpu/bench-kv-smollm2-2048-bf16.npy.zst ]; then
    python3 -c 'import sys, zstandard; open(sys.argv[2], "wb").write(zstandard.ZstdDecompressor().decompress(open(sys.argv[1], "rb").read()))' \
        .gpu/bench-kv-smollm2-2048-bf16.npy.zst "$KV/bench-kv-smollm2-2048-bf16.npy"
fi

SIZE=${SIZE:-1GiB}
REPEATS=${REPEATS:-5}
step test_cuda 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py
# first the short one: page-locked memory and the host pool (session 26)
step pinned_alloc 60 python3 bench/pinned_alloc.py --out "$OUT/gpu_pinned_alloc.json"
# where a restore into GPU memory spends its time, next to one into CPU memory (session 26)
step gpu_split 90 python3 bench/gpu_restore_split.py --size 512MiB --rounds 5 --cache-dir "$KV" \
    --out "$OUT/gpu_restore_split.json"
step reload_bf16_raw 260 python3 bench/reload.py --dtype bf16 --codec raw --size "$SIZE" --repeats "$REPEATS" --seed 1 \
    --cache-dir "$KV" --out "$OUT/gpu_reload_bf16_raw.json"
# how fast read patterns fill a restore's memory on this machine's disk, without the engine (session 27)
step direct_ceiling 75 python3 bench/direct_ceiling.py --dtype bf16 --size 512MiB --rounds 3 --seed 1 \
    --cache-dir "$KV" --out "$OUT/gpu_direct_ceiling.json"
# whether compression pays with many cores: the most favourable compressed pipeline, no engine
# (session 29; needs blosc2 and its dependencies, as wheels in .whl/ where there is no index)
if python3 -c 'import blosc2' 2>/dev/null; then
    step compressed_ceiling 70 python3 bench/compressed_ceiling.py --dtype bf16 --size 512MiB --rounds 3 --seed 1 \
        --decode-threads 8 --codecs shuffle-zstd1,shuffle-lz4 --cache-dir "$KV" --out "$OUT/gpu_compressed_ceiling.json"
fi
# the rest of the suite sees a CPU-only machine (tests/conftest.py); SIGINT at the limit still
# prints pytest's summary
rm -f "$OUT"/*.png  # at most 8 files come back from the device tool; plots are redrawn from the JSON
SUITE_S=$(( $(left) < 200 ? $(left) - 10 : 190 ))
step suite 200 timeout -s INT "$SUITE_S" python3 -m pytest -q -p no:cacheprovider -rf --tb=short \
    -m "not model and not vllm and not stress" -n 8 --ignore tests/test_cuda.py tests
echo "done in $(( $(date +%s) - START ))s" | tee -a "$OUT/steps.txt"
