#!/usr/bin/env bash
# The conversion pipeline a team runs on its checkpoint, stage by stage:
# export, compile, verify. On a runner with an SC7 PCIe card BACKEND=sail runs
# the bmodel on the card; our CPU CI runs the same script with BACKEND=cmodel
# (the BM1684X simulator inside tpu-mlir). Any stage that misses a threshold
# exits non-zero and stops the pipeline.
#
#   MODEL=path/to/checkpoint ci/pipeline.sh
#
# Settings (environment): MODEL (required), WORK (default work/<model name>),
# QUANT (int4), VISION_QUANT (bf16), SEQ (512), CHUNK (128, or SEQ when shorter), BACKEND (sail),
# PICTURES (100, for a checkpoint that declares a task), LVB (the lvb command, default .venv/bin/lvb),
# DEVICE (0: the card's device id, BACKEND=sail only), CHECK (all: which nets the compile checks on the
# simulator; verify checks every net whatever it is).
set -euo pipefail

: "${MODEL:?set MODEL to the checkpoint folder}"
WORK=${WORK:-work/$(basename "$MODEL")}
QUANT=${QUANT:-int4}
VISION_QUANT=${VISION_QUANT:-bf16}
SEQ=${SEQ:-512}
CHUNK=${CHUNK:-$(( SEQ < 128 ? SEQ : 128 ))}  # lvb refuses a chunk longer than the sequence
BACKEND=${BACKEND:-sail}
PICTURES=${PICTURES:-100}
LVB=${LVB:-.venv/bin/lvb}
DEVICE=${DEVICE:-0}
CHECK=${CHECK:-all}

if [ "$BACKEND" = sail ]; then
    # Before anything else: the SDK, driver and libsophon, the device's memory, and micro-nets
    # run on the card against the simulator (exits 1 naming the first failure and its cause).
    "$LVB" doctor --device "$DEVICE"
fi
"$LVB" export --model "$MODEL" --out "$WORK" --seq "$SEQ" --chunk "$CHUNK"
"$LVB" compile --work "$WORK" --quant "$QUANT" --vision-quant "$VISION_QUANT" --seq "$SEQ" --check "$CHECK"
if [ "$BACKEND" = sail ]; then
    # Before the card runs anything: the SDK version, the device, the memory plan of this
    # bmodel and the preflight against the device's free memory (exits 1 when it cannot fit).
    # The file names the chunk sizes sorted and joined by "-" (CHUNK may be a list: 16,32,128).
    CHUNK_TAG=$(tr ',' '\n' <<<"$CHUNK" | sort -n | paste -sd- -)
    BMODEL=$(ls -t "$WORK"/*_"$QUANT"_*seq"$SEQ"_chunk"$CHUNK_TAG"_*.bmodel | head -n 1)
    "$LVB" inspect "$BMODEL" --device "$DEVICE"
fi
"$LVB" verify --model "$MODEL" --work "$WORK" --quant "$QUANT" --backend "$BACKEND" --pictures "$PICTURES"
