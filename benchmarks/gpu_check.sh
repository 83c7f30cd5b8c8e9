#!/usr/bin/env bash
# The CUDA check (make gpu-check): what a GPU machine must show before anyone trains SAPD on it.
#
#   bash benchmarks/gpu_check.sh [cuda] [ddp] [bench] [train] [suite]
#
# No step named: cuda ddp bench train, in this order, sized to end within 10 minutes on one GPU.
#   cuda   tests/test_cuda.py: CPU parity of the network, losses, gradients and post-processing; fp16 / bf16
#          steps; whole Lightning runs with trainer=gpu; with 2 GPUs, NCCL DDP steps in which one process's
#          batch holds no box -> $OUT_DIR/cuda.log
#   ddp    with 2 GPUs or more: python -m sapd.train trainer=ddp trainer.devices=2 on the synthetic set (both
#          phases, validation gathered from both processes) -> $OUT_DIR/ddp.log; with one GPU: skipped, and says so
#   bench  python -m benchmarks device=cuda with few repetitions ($BENCH_ARGS): SAPD vs RetinaNet / FCOS at
#          800x1333, fp16 autocast, the FPS table -> $OUT_DIR/results_cuda.{json,md}
#   train  a short SAPD R-50 run at 800 px with AMP (16-mixed, experiment=r50 on the synthetic set, random
#          weights: COCO and the ImageNet weights are not on the machine), both phases
#          -> $OUT_DIR/r50_800_amp.log and its summary.json (seconds per step, peak GPU memory)
#   suite  the whole test suite on the GPU machine (not in the default: it takes longer) -> $OUT_DIR/suite.log
#
# Each step prints its duration, the end the total; $OUT_DIR/steps.txt keeps them.
# PY (default: python) runs everything; OUT_DIR (default: benchmarks/gpu) receives the results;
# PYTEST_ARGS adds pytest options to cuda and suite (e.g. "-n 8" with pytest-xdist); R50_STEPS (default 40)
# sets the training batches per epoch of the R-50 run (2 epochs; phase 2 from the second); BENCH_ARGS
# replaces the bench's repetitions ("" runs the full CUDA bench).
set -uo pipefail
PY=${PY:-python}
OUT_DIR=${OUT_DIR:-benchmarks/gpu}
R50_STEPS=${R50_STEPS:-40}
BENCH_ARGS=${BENCH_ARGS-reps_infer=5 reps_train=3 reps_assign=5 fps_reps=5 options=false}
STEPS="cuda ddp bench train suite"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(cuda ddp bench train)
for step in "${steps[@]}"; do
    case " $STEPS " in
    *" $step "*) ;;
    *)
        echo "gpu-check: unknown step '$step': choose from ${STEPS// /, }" >&2
        exit 2
        ;;
    esac
done

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "gpu-check: '$PY' cannot import torch: run make install first, or set PY= to the project's Python" >&2
    exit 2
fi
if ! gpus=$("$PY" -c "import torch, sys; n = torch.cuda.device_count() if torch.cuda.is_available() else 0; print(n); sys.exit(n == 0)" 2>/dev/null); then
    echo "gpu-check: torch sees no CUDA GPU here (torch.cuda.is_available() is False): run it on a CUDA machine" \
        "(docs/gpu_check.md: a torch build for the machine's CUDA driver)" >&2
    exit 2
fi

mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    "$PY" -c "import torch, torchvision, lightning, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'torchvision', torchvision.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__)"
    echo "GPUs seen by torch: $gpus; CPU cores: $(nproc)"
} | tee "$OUT_DIR/machine.txt"
: >"$OUT_DIR/steps.txt"

drawn=0
draw_synthetic() { # the default synthetic set, drawn once with every core (a training run would use two)
    [ $drawn -eq 1 ] && return 0
    "$PY" -m sapd.data.synthetic "workers=$(nproc)" >/dev/null && drawn=1
}

status=0
total_start=$(date +%s)
for step in "${steps[@]}"; do
    start=$(date +%s)
    result=""
    case $step in
    cuda)
        # shellcheck disable=SC2086
        "$PY" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} tests/test_cuda.py 2>&1 | tee "$OUT_DIR/cuda.log"
        rc=${PIPESTATUS[0]}
        ;;
    ddp)
        if [ "$gpus" -lt 2 ]; then
            result="skipped: $gpus GPU here, the 2-process NCCL run needs 2 (the cuda step's NCCL test skips too)"
            rc=0
        else
            draw_synthetic &&
                "$PY" -m sapd.train trainer=ddp trainer.devices=2 task_name=gpu_check_ddp \
                    trainer.max_epochs=2 trainer.limit_train_batches=20 data.limit_val_images=64 \
                    validate_best=false logger=csv callbacks.progress_bar=null \
                    "hydra.run.dir=$OUT_DIR/ddp" 2>&1 | tee "$OUT_DIR/ddp.log"
            rc=${PIPESTATUS[0]}
            [ "$rc" -eq 0 ] && [ ! -f "$OUT_DIR/ddp/summary.json" ] && rc=1
        fi
        ;;
    bench)
        # shellcheck disable=SC2086
        "$PY" -m benchmarks device=cuda "out=$OUT_DIR/results_cuda.json" $BENCH_ARGS 2>&1 | tee "$OUT_DIR/bench.log"
        rc=${PIPESTATUS[0]}
        ;;
    train)
        draw_synthetic &&
            "$PY" -m sapd.train experiment=r50 data=synthetic task_name=gpu_check_r50 \
                model.backbone.pretrained=false model.backbone.frozen_stages=-1 model.backbone.norm_eval=false \
                data.min_size=800 data.max_size=1333 data.val_min_size=null data.val_max_size=null \
                data.size_divisor=128 data.batch_size=8 data.val_batch_size=8 "data.num_workers=$(($(nproc) / 2))" \
                data.limit_val_images=64 trainer.precision=16-mixed trainer.max_epochs=2 \
                "trainer.limit_train_batches=$R50_STEPS" validate_best=false logger=csv callbacks.progress_bar=null \
                "hydra.run.dir=$OUT_DIR/r50_800_amp" 2>&1 | tee "$OUT_DIR/r50_800_amp.log"
        rc=${PIPESTATUS[0]}
        [ -f "$OUT_DIR/r50_800_amp/summary.json" ] && cp "$OUT_DIR/r50_800_amp/summary.json" "$OUT_DIR/r50_800_amp_summary.json"
        ;;
    suite)
        # shellcheck disable=SC2086
        "$PY" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} tests 2>&1 | tee "$OUT_DIR/suite.log"
        rc=${PIPESTATUS[0]}
        ;;
    esac
    [ -z "$result" ] && result=$([ "$rc" -eq 0 ] && echo passed || echo "FAILED (exit $rc)")
    echo "gpu-check: $step $result, $(($(date +%s) - start)) s" | tee -a "$OUT_DIR/steps.txt"
    [ "$rc" -ne 0 ] && status=1
done
echo "gpu-check: ${steps[*]}: $([ $status -eq 0 ] && echo passed || echo FAILED) in $(($(date +%s) - total_start)) s" |
    tee -a "$OUT_DIR/steps.txt"
exit $status
