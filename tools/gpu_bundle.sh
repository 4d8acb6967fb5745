#!/usr/bin/env bash
# Make, on this machine, what a lent GPU machine needs for `make bench-gpu` and cannot fetch itself
# (it reaches no package registry and has no ffmpeg):
#
#   .whl/    wheels of the project's imports its image lacks, for its Python (3.12) and torch (2.11):
#            av (PyAV, with FFmpeg 8 libraries inside), decord, webdataset + braceexpand, ffmpeg-python +
#            future, and torchcodec 0.<torch minor> (PyPI's CPU build; its FFmpeg comes from PyAV's
#            libraries, see tools/bench_gpu.sh).
#   .bench/  the pre-made test video: 60 s 1280x720 30 fps H.264 (800 kbit/s) + AAC, made by
#            benchmarks/decode.py's make_video, and the same file where benchmarks/extract.py's
#            --cache-dir layout looks for it (a relative link).
#
# Both folders are ignored by git (.gitignore and .git/info/exclude); name them in the device tool's
# `carry` ([".whl", ".bench"]). Everything that travels must stay under 64 MiB; the total is printed.
#
#   tools/gpu_bundle.sh                       # defaults: Python 3.12, torch 2.11.0
#   GPU_PYTHON=3.12 GPU_TORCH=2.11.0 tools/gpu_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."

GPU_PYTHON=${GPU_PYTHON:-3.12}
GPU_TORCH=${GPU_TORCH:-2.11.0}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
minor=${GPU_TORCH#2.}; minor=${minor%%.*}
TORCHCODEC="torchcodec==0.${minor}.*"   # torchcodec 0.N pairs with torch 2.N (constraints.txt: 2.13 / 0.13)

# versions as pinned in this venv where it has them (one version of each: two stop the install there)
WHEELS=(av==18.1.0 decord==0.6.0 webdataset==1.0.2 braceexpand==0.1.7 ffmpeg-python==0.2.0 future==1.0.0
        "$TORCHCODEC")

for f in .whl .bench; do
    grep -qxF "/$f/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$f/" >> .git/info/exclude; }
done

mkdir -p .whl .bench
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux2010_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
for w in "${WHEELS[@]}"; do
    name=${w%%==*}
    existing=(.whl/"${name//-/_}"-*.whl)
    if [ -e "${existing[0]}" ]; then continue; fi  # already downloaded
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
        "${PLATFORMS[@]}" -d .whl "$w"
done

video=.bench/bench_720p_60s.mp4
if [ ! -s "$video" ]; then
    "$PY" -c "import sys; from pathlib import Path; sys.path.insert(0, '.');
from benchmarks.decode import make_video
make_video(Path('$video.tmp.mp4'), 60, 1280, 720, 30, bitrate='800k')"
    mv "$video.tmp.mp4" "$video"
fi
# benchmarks/extract.py --cache-dir .bench finds it here and does not need ffmpeg to make it
mkdir -p .bench/extract-1280x720-30fps-60s
ln -sfn ../bench_720p_60s.mp4 .bench/extract-1280x720-30fps-60s/bench.mp4

tree_bytes=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s -- 2>/dev/null \
              | awk '{s += $1} END {print s + 0}')
carry_bytes=$(du -sb .whl .bench | awk '{s += $1} END {print s}')  # the link counts as a link
total=$((tree_bytes + carry_bytes))
ls -la .whl .bench
awk -v t="$tree_bytes" -v c="$carry_bytes" -v s="$total" 'BEGIN {
    printf "source tree %.1f MiB + .whl and .bench %.1f MiB = %.1f MiB of the 64 MiB a call may carry\n",
           t / 1048576, c / 1048576, s / 1048576 }'
if [ "$total" -gt $((64 * 1048576)) ]; then
    echo "over 64 MiB: leave decord out (rm .whl/decord-*; the suite then decodes with PyAV)" >&2
    exit 1
fi
