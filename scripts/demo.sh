#!/usr/bin/env bash
# `make demo`: the toy from checkpoint to answers on the BM1684X simulator.
# Every stage is cached, so a second run only answers the two questions.
set -euo pipefail
cd "$(dirname "$0")/.."

LVB=.venv/bin/lvb
MODEL=models/toy
WORK=work/toy
SEQ=128
CHUNK=32
QUANT=int4

"$LVB" doctor
MODEL=$MODEL WORK=$WORK QUANT=$QUANT SEQ=$SEQ CHUNK=$CHUNK BACKEND=cmodel ci/pipeline.sh

BMODEL=$WORK/toy_${QUANT}_g64_seq${SEQ}_chunk${CHUNK}_bm1684x.bmodel
PHOTO=$(.venv/bin/python -c "import pathlib, skimage.data; print(pathlib.Path(skimage.data.__file__).parent / 'astronaut.png')")
SYNTHETIC=$WORK/synthetic.png
.venv/bin/python -c "
import sys, numpy as np
from lvb.tasks import draw
image, answer = draw(np.random.default_rng(2026))
image.save(sys.argv[1])
print(f'synthetic picture: {answer}')" "$SYNTHETIC"

for IMAGE in "$PHOTO" "$SYNTHETIC"; do
  echo "== $(basename "$IMAGE"): What is in the picture?"
  "$LVB" run --model "$MODEL" --bmodel "$BMODEL" --backend cmodel --image "$IMAGE" \
    --prompt "What is in the picture?" --stats
done

echo
echo "== serve the toy (OpenAI-compatible API and a chat page at http://127.0.0.1:8000/):"
echo "   $LVB serve --model $MODEL --bmodel $BMODEL --backend cmodel    # the BM1684X simulator"
echo "   $LVB serve --model $MODEL --onnx $WORK                          # onnxruntime, faster on a CPU"
