#!/usr/bin/env sh
# Run the GPU suite (benchmarks/gpu_suite.py) with whatever python is here: `make bench-gpu` calls this;
# on a machine without make, run it directly: `sh tools/bench_gpu.sh [--device cuda] [--quick] ...`
# (arguments go to the suite).
#
# Without the venv (a lent GPU machine: its own python3 and torch, no registry) the wheels carried in
# .whl/ (tools/gpu_bundle.sh) are installed into $GPU_SITE (default /tmp/site) and put on PYTHONPATH, and
# torchcodec is pointed at the FFmpeg 8 libraries inside PyAV's wheel (av.libs): links with the plain
# names it loads (libavcodec.so.62, ...) go to $GPU_SITE/ffmpeg-libs, both folders to LD_LIBRARY_PATH.
set -e
cd "$(dirname "$0")/.."
GPU_SITE=${GPU_SITE:-/tmp/site}
if [ -x .venv/bin/python ]; then
    PY=${SUITE_PYTHON:-.venv/bin/python}
else
    PY=${SUITE_PYTHON:-python3}
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$GPU_SITE" .whl/*.whl
        mkdir -p "$GPU_SITE/ffmpeg-libs"
        for f in "$GPU_SITE"/av.libs/libav*.so.* "$GPU_SITE"/av.libs/libsw*.so.*; do
            [ -e "$f" ] || continue
            b=${f##*/}
            ln -sfn "$f" "$GPU_SITE/ffmpeg-libs/${b%%-*}.so.$(echo "$b" | sed -E 's/.*\.so\.([0-9]+).*/\1/')"
        done
        export PYTHONPATH="$GPU_SITE${PYTHONPATH:+:$PYTHONPATH}"
        export LD_LIBRARY_PATH="$GPU_SITE/ffmpeg-libs:$GPU_SITE/av.libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
fi
exec "$PY" benchmarks/gpu_suite.py "$@"
