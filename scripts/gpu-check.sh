#!/usr/bin/env bash
# One prepared device check for a CUDA machine (under 8 minutes on one H200):
#   1. `medmine --device cuda check` (with TF32 off; then again with it, report only): U-Net++ gradients vs finite differences, train-mode
#      gradients, inference and a training curve vs the CPU, an overfit run, and SAM (vit_b-style
#      and vit_t parity fixtures) vs the official PyTorch outputs;
#   2. `medmine bench train|infer|sam` beside the PyTorch reference scripts on the same GPU,
#      interleaved, and one table with the ratios and the targets: training step <= 1.25x
#      PyTorch's time, inference <= 1.0x, SAM encoders <= 1.25x, decoder <= 5 ms per click.
#
# Build the binary here (no GPU needed; see README "CUDA"):
#   eval "$(scripts/cuda-toolkit.sh)"
#   CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda,cudnn
#   strip -o target/medmine-cuda target/cuda/release/medmine   # ~360 MB with line tables
#   gzip -1 -c target/medmine-cuda > target/medmine-cuda.gz     # 81 MB stripped -> 29 MB
# and, for the PyTorch SAM reference (the GPU machine has torch but may have no internet):
#   pip install --target target/pydeps --no-deps segment-anything mobilesam-mirror timm
#   tar czf target/pydeps.tar.gz -C target pydeps      # 4 MB instead of 19 (carry limit 64 MiB)
# then run it there with the device tool, carrying both:
#   run(command="scripts/gpu-check.sh target/medmine-cuda.gz", carry=["target/medmine-cuda.gz",
#       "target/pydeps.tar.gz"], timeout_s=400)          # 117 s on an H200
# Environment: PYTHON (default python3, with torch built for CUDA), STEPS (timed steps, 5),
# DEVICE (default cuda; `DEVICE=cpu QUICK=1` tries the plumbing on any machine: small sizes,
# vit_t only).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/medmine-cuda}
PY=${PYTHON:-python3}
STEPS=${STEPS:-5}
DEVICE=${DEVICE:-cuda}
if [ -n "${QUICK:-}" ]; then SZ="--size 64 --batch 2 --base 8"; VARIANTS="vit_t"; OVERFIT="--overfit-steps 60"
else SZ="--size 256 --batch 8 --base 32"; VARIANTS="vit_t vit_b"; OVERFIT=""; fi
OUT=${OUT:-/tmp}/gpu-check
mkdir -p "$OUT"
if [ "${BIN%.gz}" != "$BIN" ] && [ -f "$BIN" ]; then   # carried gzipped (carry limit 64 MiB)
  gunzip -c "$BIN" > /tmp/medmine-cuda && chmod +x /tmp/medmine-cuda && BIN=/tmp/medmine-cuda
fi
[ -x "$BIN" ] || { echo "error: $BIN is not an executable medmine (argument 1)" >&2; exit 2; }
# the PyTorch SAM reference's packages, carried as a folder or a tarball of it
if [ ! -d target/pydeps ] && [ -f target/pydeps.tar.gz ]; then tar xzf target/pydeps.tar.gz -C target; fi
[ -d target/pydeps ] && export PYTHONPATH="$PWD/target/pydeps${PYTHONPATH:+:$PYTHONPATH}"

# The CUDA libraries the binary links (libcudart, cuBLAS, cuRAND, cuDNN): PyTorch's wheels.
LIBS=$("$PY" - <<'EOF' 2>/dev/null
import glob, os, site
dirs = []
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    dirs += glob.glob(os.path.join(sp, "nvidia", "*", "lib"))
print(":".join(dirs))
EOF
)
export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
"$BIN" --version 2>/dev/null | head -n1

status=0
# cuDNN's default math lets f32 convolutions run in TF32 on Ampere and newer GPUs (10-bit
# mantissa): the gate runs with TF32 off (NVIDIA_TF32_OVERRIDE=0), where the device must compute
# what the CPU computes; a second run shows what TF32 changes (report only).
echo "== medmine check ($DEVICE, TF32 off)"
NVIDIA_TF32_OVERRIDE=0 timeout 300 "$BIN" --device "$DEVICE" check --fixtures tests/fixtures $OVERFIT 2>&1 | tee "$OUT/check.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
if [ "$DEVICE" != cpu ]; then
  echo "== medmine check ($DEVICE, TF32 as cuDNN's default: report only)"
  timeout 300 "$BIN" --device "$DEVICE" check --fixtures tests/fixtures $OVERFIT > "$OUT/check-tf32.txt" 2>&1
  grep -E "^\|" "$OUT/check-tf32.txt"
fi

last() { tail -n1 "$1" 2>/dev/null; }
field() { awk -v k="$2" '{for (i = 1; i < NF; i++) if ($i == k) print $(i + 1)}' "$1" | tail -n1; }

run_pair() { # name, medmine args, python args
  local name=$1 m=$2 p=$3
  timeout 120 "$BIN" --device "$DEVICE" $m > "$OUT/$name.medmine.txt" 2>&1
  timeout 120 "$PY" $p --device "$DEVICE" > "$OUT/$name.torch.txt" 2>&1
  echo "$name: medmine [$(last "$OUT/$name.medmine.txt")] pytorch [$(last "$OUT/$name.torch.txt")]"
}

echo "== benchmarks ($DEVICE), medmine then PyTorch, per measure"
run_pair train "bench train $SZ --steps $STEPS --warmup 2" \
  "scripts/bench_train_torch.py $SZ --steps $STEPS --warmup 2"
run_pair infer "bench infer $SZ --steps $STEPS --warmup 2" \
  "scripts/bench_train_torch.py --infer $SZ --steps $STEPS --warmup 2"
for v in $VARIANTS; do
  run_pair "sam_$v" "bench sam --variant $v --runs 3" "scripts/bench_sam_torch.py --variant $v --runs 3"
done

# the table: ratio = medmine's time / PyTorch's time (lower is better)
echo "sizes: $SZ; SAM: $VARIANTS, random weights, synthetic 1024x1024 image"
"$PY" - "$OUT" "$VARIANTS" <<'EOF' || status=1
import re, sys
out = sys.argv[1]
def val(name, side, key):
    try:
        text = open(f"{out}/{name}.{side}.txt").read()
    except OSError:
        return None
    m = re.findall(rf"^{key} ([0-9.eE+-]+)", text, re.M) or re.findall(rf"{key} ([0-9.eE+-]+)", text)
    return float(m[-1]) if m else None
rows = []
def ratio(label, name, key, target, invert=False):
    a, b = val(name, "medmine", key), val(name, "torch", key if not key.startswith("encoder") else "encoder_s")
    if key == "encoder_ms" and b is not None:
        b *= 1e3
    if a is None or b is None or a == 0 or b == 0:
        rows.append((label, a, b, None, f"<= {target}x", "MISSING"))
        return
    r = (b / a) if invert else (a / b)
    rows.append((label, a, b, r, f"<= {target}x", "pass" if r <= target else "FAIL"))
# images/s: time ratio = torch_ips / medmine_ips
variants = sys.argv[2].split()
ratio("U-Net++ training step (images/s)", "train", "images_per_s", 1.25, invert=True)
ratio("U-Net++ inference (images/s)", "infer", "images_per_s", 1.0, invert=True)
for v in variants:
    ratio(f"SAM {v} encoder (ms)", f"sam_{v}", "encoder_ms", 1.25)
for v in variants:
    a, b = val(f"sam_{v}", "medmine", "decoder_ms"), val(f"sam_{v}", "torch", "decoder_ms")
    ok = a is not None and a <= 5.0
    rows.append((f"SAM {v} decoder per click (ms)", a, b, None if a is None or not b else a / b,
                 "<= 5 ms", "pass" if ok else ("MISSING" if a is None else "FAIL")))
fmt = lambda x: "-" if x is None else f"{x:.4g}"
print("\n| measure | medmine | PyTorch | medmine time / PyTorch time | target | result |")
print("|---|---:|---:|---:|---|---|")
for label, a, b, r, t, res in rows:
    print(f"| {label} | {fmt(a)} | {fmt(b)} | {fmt(r)} | {t} | {res} |")
sys.exit(0 if all(r[-1] == "pass" for r in rows) else 1)
EOF
[ $? -eq 0 ] || status=1
grep -E "checks passed" "$OUT/check.txt" || echo "check: no summary (see $OUT/check.txt)"
exit $status
