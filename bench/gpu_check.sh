#!/usr/bin/env bash
# The GPU check, run on a machine with a CUDA device from the repository root:
#
#   bash bench/gpu_check.sh          results in $OUT (default .scratch/gpu-check)
#
# 1. installs the wheels in .whl/ (if any) into /tmp/site: the GPU machine has torch but
#    not dask, zarr and the rest, and cannot download them (see README, "GPU");
# 2. runs the `gpu` tests (CUDA decode vs CPU, byte-identical CUDA runs, one worker per
#    GPU in the embedded cluster, each pinned to its device, the pipelined CUDA decode,
#    two workers sharing a GPU) and checks the image codecs' bytes on this host's CPU;
# 3. runs bench/decode.py on CUDA: bare decode, bare decode + PNG, and the pipeline with
#    WORKERS worker processes (default 1, 4 and 8, round-robin over the GPUs: several
#    share one), the bare loops repeated for at least MIN_SECONDS each;
# 4. runs bench/decode.py --vae sd --size 512 (SD's AutoencoderKL, randomly initialised
#    from diffusers' config: about 2.5 TFLOP per image) with VAE_COUNT images (default
#    256: four output shards, whole tasks for 1 and 2 workers), needing the diffusers
#    wheel in .whl/;
# 5. writes gpu-check.json: device, versions, test counts and the benchmark numbers.
#
# DEVICE=cpu COUNT=4000 MIN_SECONDS=0 bash bench/gpu_check.sh runs the same steps on a
# machine without a GPU (the gpu tests then skip), to check the script itself.
set -uo pipefail
OUT="${OUT:-.scratch/gpu-check}"
DEVICE="${DEVICE:-cuda}"
COUNT="${COUNT:-163840}"  # 16 output shards: whole tasks for 1, 4 and 8 workers
WORKERS="${WORKERS:-1 4 8}"
MIN_SECONDS="${MIN_SECONDS:-10}"
mkdir -p "$OUT"
export MPLBACKEND=Agg PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PYTHON="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null && [ -z "${NO_WHEELS:-}" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
started=$(date +%s)
timeout 240 "$PYTHON" -m pytest tests/test_gpu.py -m gpu -p no:cacheprovider -q -rA \
  --junitxml "$OUT/gpu-tests.xml" > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests: exit $? in $(( $(date +%s) - started )) s"
# the image codecs' bytes on this host's CPU equal the reference bytes (test_codecs.py)
timeout 60 "$PYTHON" -m pytest tests/test_codecs.py -k every_machine -p no:cacheprovider -q \
  > "$OUT/codec-bytes.log" 2>&1
echo "codec bytes: exit $?"
started=$(date +%s)
# shellcheck disable=SC2086  # WORKERS is a list
timeout 240 "$PYTHON" bench/decode.py --device "$DEVICE" --count "$COUNT" --workers $WORKERS \
  --min-seconds "$MIN_SECONDS" --json --workdir /tmp/latentbatch-gpu-bench \
  > "$OUT/bench.json" 2> "$OUT/bench.log"
echo "bench: exit $? in $(( $(date +%s) - started )) s"
started=$(date +%s)
timeout 300 "$PYTHON" bench/decode.py --device "$DEVICE" --vae sd --size 512 \
  --count "${VAE_COUNT:-256}" --workers 1 2 --passes 2 --json \
  --workdir /tmp/latentbatch-gpu-bench-sd > "$OUT/bench-sd512.json" 2> "$OUT/bench-sd512.log"
echo "bench sd 512: exit $? in $(( $(date +%s) - started )) s"

"$PYTHON" - "$OUT" <<'PY'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
report = {}
smi = (out / "nvidia-smi.txt").read_text() if (out / "nvidia-smi.txt").exists() else ""
report["driver"] = next(
    (line.split("Driver Version:")[1].split()[0] for line in smi.splitlines() if "Driver" in line),
    None,
)
for key, name in (("benchmark", "bench.json"), ("benchmark_sd512", "bench-sd512.json")):
    try:
        report[key] = json.loads((out / name).read_text())
    except (OSError, ValueError) as exc:
        report[key] = {"error": str(exc)}
try:
    suite = ET.parse(out / "gpu-tests.xml").getroot().find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    report["gpu_tests"] = counts
except (OSError, ET.ParseError, AttributeError) as exc:
    report["gpu_tests"] = {"error": str(exc)}
codec_log = out / "codec-bytes.log"
lines = codec_log.read_text().strip().splitlines() if codec_log.exists() else ["missing"]
report["codec_bytes_test"] = lines[-1]
text = json.dumps(report, indent=2, sort_keys=True)
(out / "gpu-check.json").write_text(text + "\n")
print(text)
PY
tail -5 "$OUT/gpu-tests.log"
tail -5 "$OUT/bench.log"
tail -5 "$OUT/bench-sd512.log"
