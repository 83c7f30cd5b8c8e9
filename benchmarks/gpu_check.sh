#!/usr/bin/env bash
# The CUDA check (make gpu-check): what a GPU machine must show before anyone trains SAPD on it.
#
#   bash benchmarks/gpu_check.sh [tests] [bench] [train]      (no step named: all three, in this order)
#
#   tests  the test suite on the GPU machine: tests/test_cuda.py (CPU parity of the network, the losses,
#          their gradients and the detections; fp16 / bf16 mixed-precision steps; whole Lightning runs
#          with trainer=gpu) and every other test beside it -> $OUT_DIR/tests.log
#   bench  python -m benchmarks device=cuda: SAPD vs RetinaNet / FCOS at 800x1333, fp16 autocast,
#          and the FPS table -> $OUT_DIR/results_cuda.{json,md}
#   train  a short SAPD R-50 run at 800 px with AMP (16-mixed, experiment=r50 on the synthetic set,
#          random weights: COCO and the ImageNet weights are not on the machine), both phases
#          -> $OUT_DIR/r50_800_amp.log and its summary.json (seconds per step, peak GPU memory, AP)
#
# PY (default: python) runs everything; OUT_DIR (default: benchmarks/gpu) receives the results;
# PYTEST_ARGS adds pytest options (e.g. "-n 8" with pytest-xdist); R50_STEPS (default 100) sets the
# training batches per epoch of the R-50 run (2 epochs; phase 2 from the second).
set -uo pipefail
PY=${PY:-python}
OUT_DIR=${OUT_DIR:-benchmarks/gpu}
R50_STEPS=${R50_STEPS:-100}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests bench train)
status=0

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: torch sees no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine" >&2
    exit 2
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    "$PY" -c "import torch, torchvision, lightning, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'torchvision', torchvision.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__)"
    nproc
} | tee "$OUT_DIR/machine.txt"

for step in "${steps[@]}"; do
    start=$(date +%s)
    case $step in
    tests)
        # shellcheck disable=SC2086
        "$PY" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} tests 2>&1 | tee "$OUT_DIR/tests.log"
        rc=${PIPESTATUS[0]}
        ;;
    bench)
        "$PY" -m benchmarks device=cuda "out=$OUT_DIR/results_cuda.json" 2>&1 | tee "$OUT_DIR/bench.log"
        rc=${PIPESTATUS[0]}
        ;;
    train)
        # Draw the synthetic set with every core first (the training run would draw it with two).
        "$PY" -m sapd.data.synthetic "workers=$(nproc)" >/dev/null &&
            "$PY" -m sapd.train experiment=r50 data=synthetic task_name=gpu_check_r50 \
                model.backbone.pretrained=false model.backbone.frozen_stages=-1 model.backbone.norm_eval=false \
                data.min_size=800 data.max_size=1333 data.val_min_size=null data.val_max_size=null \
                data.size_divisor=128 data.batch_size=8 data.val_batch_size=8 "data.num_workers=$(($(nproc) / 2))" \
                trainer.precision=16-mixed trainer.max_epochs=2 "trainer.limit_train_batches=$R50_STEPS" \
                validate_best=false logger=csv callbacks.progress_bar=null \
                "hydra.run.dir=$OUT_DIR/r50_800_amp" 2>&1 | tee "$OUT_DIR/r50_800_amp.log"
        rc=${PIPESTATUS[0]}
        [ -f "$OUT_DIR/r50_800_amp/summary.json" ] && cp "$OUT_DIR/r50_800_amp/summary.json" "$OUT_DIR/r50_800_amp_summary.json"
        ;;
    *)
        echo "gpu-check: unknown step '$step' (tests, bench or train)" >&2
        rc=2
        ;;
    esac
    echo "gpu-check: $step exit $rc, $(($(date +%s) - start)) s" | tee -a "$OUT_DIR/steps.txt"
    [ "$rc" -ne 0 ] && status=1
done
exit $status
