#!/usr/bin/env bash
# The GPU paths end to end, on a machine with a CUDA GPU: every stage with trainer.device=cuda,
# bf16 autocast, channels_last, torch.compile, a feature method (CRD's memory on the GPU), DDP over
# NCCL through torchrun, compress with recovery on the GPU (int8 then runs on the CPU), the
# throughput benchmark against a hand-written loop (batch 64 with fused and foreach optimisers and CUDA
# graphs through trainer.compile=reduce-overhead, 128, 256; with the 240-epoch estimate),
# and the teacher cache on the GPU (benchmark and a CLI sweep). Usage: bash benchmarks/gpu_check.sh OUT_DIR
set -uo pipefail
OUT=${1:-gpu-check}; mkdir -p "$OUT"; W=$(mktemp -d); cd "$W" || exit 1
KD="python3 -m kd_cli"; Q="trainer.progress=plain trainer.num_workers=0"
status=0
step() {  # step NAME COMMAND...: run, log, record the exit code
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  printf '%-28s rc=%d  %4ds  %s\n' "$name" $rc $((SECONDS - start)) "$(grep -E 'kd: error|top-1 \(last\)|test top-1 \(last\)|ratio|Error' "$OUT/$name.log" | tail -2 | tr -s ' ' | tr '\n' ' ')"
  [ $rc -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
step teacher_cuda_bf16 $KD train-teacher dataset=digits teacher=cnn trainer.device=cuda trainer.epochs=5 $Q hydra.run.dir=$W/teacher
step summary_teacher python3 -c "import json; s=json.load(open('$W/teacher/summary.json')); e=json.load(open('$W/teacher/env.json')); print(s['status'], s['last_top1'], e['device']); assert s['status']=='complete' and 'cuda' in e['device']"
step distill_kd_cl_compile $KD distill dataset=digits teacher.checkpoint=$W/teacher student=cnn student.kwargs.width=8 method=kd trainer.device=cuda trainer.precision=bf16 trainer.channels_last=true trainer.compile=true trainer.epochs=3 $Q hydra.run.dir=$W/kd
step distill_crd_cuda $KD distill dataset=digits teacher.checkpoint=$W/teacher student=cnn student.kwargs.width=8 method=crd trainer.device=cuda trainer.epochs=3 $Q hydra.run.dir=$W/crd
step distill_fp16 $KD distill dataset=digits teacher.checkpoint=$W/teacher student=mlp method=dkd trainer.device=cuda trainer.precision=fp16 trainer.epochs=3 $Q hydra.run.dir=$W/fp16
step ddp_nccl_1proc torchrun --standalone --nproc_per_node=1 -m kd_cli distill dataset=digits teacher.checkpoint=$W/teacher student=mlp trainer.device=cuda trainer.epochs=2 $Q hydra.run.dir=$W/ddp
step evaluate_cuda $KD evaluate run=$W/kd trainer.device=cuda hydra.run.dir=$W/eval
step compress_cuda $KD compress run=$W/teacher compression=prune_quantize trainer.device=cuda trainer.epochs=3 latency_batches=5 $Q hydra.run.dir=$W/pq
step evaluate_int8_on_cuda_box $KD evaluate run=$W/pq trainer.device=cuda hydra.run.dir=$W/eval8
step bad_device_index bash -c "$KD distill dataset=digits trainer.device=cuda:7 trainer.epochs=1 $Q hydra.run.dir=$W/bad 2>&1 | tee /dev/stderr | grep -q 'kd: error: .*cuda:7'"
step cifar_resnet_bench_b64 python3 "$OLDPWD/benchmarks/throughput.py" --device cuda --teacher resnet32x4 --student resnet8x4 --batch 64 --samples 8192 --epochs 3 --aug-samples 10000 --workers 8 --compile reduce-overhead
step cifar_resnet_bench_b64_unfused python3 "$OLDPWD/benchmarks/throughput.py" --device cuda --teacher resnet32x4 --student resnet8x4 --batch 64 --samples 8192 --epochs 3 --aug-samples 10000 --workers 8 --fused false
step teacher_cache_cuda python3 "$OLDPWD/benchmarks/teacher_cache.py" --device cuda --teacher resnet32x4 --student resnet8x4 --samples 8192 --epochs 3
step sweep_cached_cli $KD distill -m dataset=digits teacher.checkpoint=$W/teacher student=mlp method.temperature=1,2,4,8 trainer.device=cuda trainer.epochs=3 $Q hydra.sweep.dir=$W/sweep
step cifar_resnet_bench python3 "$OLDPWD/benchmarks/throughput.py" --device cuda --teacher resnet32x4 --student resnet8x4 --batch 128 --samples 8192 --epochs 3 --aug-samples 50000 --workers 8
step cifar_resnet_bench_b256 python3 "$OLDPWD/benchmarks/throughput.py" --device cuda --teacher resnet32x4 --student resnet8x4 --batch 256 --samples 16384 --epochs 3 --aug-samples 10000 --workers 8
for f in "$W"/*/summary.json; do echo "$f $(python3 -c "import json,sys; s=json.load(open('$f')); print(s.get('status'), s.get('last_top1') or s.get('top1'), s.get('images_per_s'))")"; done
tail -n 8 "$OUT/cifar_resnet_bench_b64.log" "$OUT/cifar_resnet_bench.log" "$OUT/cifar_resnet_bench_b256.log" "$OUT/teacher_cache_cuda.log"
exit $status
