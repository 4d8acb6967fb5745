"""Cost of the lineage checks: `mcn status` on a synthetic workspace of N shards (default 20,000).

Builds (once, cached under $TMPDIR/mcn-bench-status-<N>) a workspace whose every unit is done for the
demo config: a scan record with an N-shard plan of 64 videos each, N caption files, 4 x N feature
shards (tiny tars, but full-size done records: 64 videos each, as at HowTo100M scale), a finished
training run and an evaluation of the workspace's own captions. Then times, each in a fresh process:

- ``mcn status`` as a whole command (imports included);
- the lineage checks alone: :func:`pipeline.status.workspace_status` after the imports;
- the same with ``--verify``'s checksums left out (status never walks the videos in this benchmark:
  there are none).

Prints one JSON line per figure. Asserts nothing.

    .venv/bin/python benchmarks/status.py                  # 20,000 shards
    .venv/bin/python benchmarks/status.py --shards 2000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OVERRIDES = ["scan.shard_size=64", "evaluate.sets=[]", "train.data.num_workers=0"]
PER_SHARD = 64


def build(ws_root: Path, n_shards: int) -> None:
    """Write the synthetic workspace (every unit done for the demo config)."""
    from pipeline.config import load_config
    from pipeline.evaluate import eval_lineage
    from pipeline.evalsets import find_set
    from pipeline.scan import list_inputs, scan_lineage
    from pipeline.stages import extract_stage, shard_jobs
    from pipeline.training import train_lineage
    from store import atomic
    from store.fields import FIELDS
    from store.layout import Workspace, checkpoint_name
    from store.lineage import fingerprint, make_record, write_record
    from store.manifest import Caption, VideoRecord, captions_text, plan_shard
    from store.reader import open_features

    cfg = load_config(ROOT / "configs" / "demo.yaml", OVERRIDES)
    ws = Workspace(ws_root)
    videos = ws_root.parent / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    plan, manifest_bytes = [], 0
    ws.captions_dir.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        recs = [VideoRecord(id=f"cat{s % 97:02d}--video{s:06d}_{i:02d}", path=f"cat{s % 97:02d}/video{s:06d}_{i:02d}.mp4",
                            shard=s, duration=390.0, size=50_000_000 + i, mtime_ns=1_700_000_000_000_000_000 + s)
                for i in range(PER_SHARD)]
        items = [(r.id, [Caption(float(k), float(k) + 3.0, f"caption {k}") for k in range(3)]) for r in recs]
        ws.captions(s).write_text(captions_text(items))
        plan.append(plan_shard(s, recs, items).to_json())
        manifest_bytes += sum(len(json.dumps(r.to_json())) + 1 for r in recs)
    with open(ws.manifest, "wb") as fh:  # status only checks its size: a sparse file of the right size
        fh.truncate(manifest_bytes)
    _, listing = list_inputs(videos, cfg.scan)
    atomic.write_json(ws.scan_record, make_record(
        "scan", scan_lineage(videos.resolve(), cfg.scan, listing), videos_root=str(videos.resolve()),
        n_videos=n_shards * PER_SHARD, n_ok=n_shards * PER_SHARD, n_failed=0, n_shards=n_shards, shard_size=64,
        captions_file=None, captions_file_error=None, failures=[], shards=plan, manifest_bytes=manifest_bytes,
        output="bench"))
    stage = extract_stage(ws, cfg)
    tar = b"\0" * 1024
    for job in shard_jobs(ws, with_records=False):
        videos_list = [{"id": f"cat{job.index % 97:02d}--video{job.index:06d}_{i:02d}", "status": "ok", "error": None}
                       for i in range(PER_SHARD)]
        for f in FIELDS:
            ws.field_dir(f).mkdir(parents=True, exist_ok=True)
            ws.shard_tar(f, job.index).write_bytes(tar)
            rec = make_record(ws.shard_unit(f, job.index), stage.lineage(f, job), shard=job.index, field=f,
                              format="shard-2", extractor=stage.describe(f), dtype="float16", n_videos=PER_SHARD,
                              n_ok=PER_SHARD, n_failed=0, videos=videos_list, bytes=len(tar),
                              sha256=fingerprint(job.index))
            ws.shard_record(f, job.index).write_text(json.dumps(rec, sort_keys=True))
    features = open_features(ws)
    lineage = train_lineage(cfg, features)
    run = ws.run_dir("default")
    ckpt = Workspace.checkpoints_dir(run) / checkpoint_name(240)
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a real checkpoint")
    write_record(ws.run_record(run), ws.run_unit(run), lineage, name="default", step=240, complete=True,
                 total_steps=240, limit=240, checkpoint=ckpt.name, epoch=60)
    spec = find_set(cfg.evaluate, "workspace")
    elin = eval_lineage(ws, cfg, spec, "workspace", ckpt, features)
    from store.lineage import file_identity

    write_record(ws.eval_record("workspace"), ws.eval_unit("workspace"), elin, set="workspace",
                 checkpoint=file_identity(ckpt))
    atomic.write_json(ws.eval_metrics("workspace"), {"n_queries": 1, "retrieval": {}})


CHECKS = """
import json, sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
from pipeline.config import load_config
from pipeline.status import workspace_status
from store.layout import Workspace
cfg = load_config({config!r}, {overrides!r})
t1 = time.perf_counter()
lines = workspace_status(Workspace({ws!r}), cfg)
t2 = time.perf_counter()
print(json.dumps({{"imports_s": t1 - t0, "checks_s": t2 - t1,
                   "states": sorted({{(x.stage, x.status) for x in lines}})}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()
    root = args.cache / f"mcn-bench-status-{args.shards}"
    ws = root / "ws"
    if not (ws / "eval" / "workspace" / "record.json").exists():
        t = time.perf_counter()
        build(ws, args.shards)
        print(json.dumps({"figure": "build_s", "value": round(time.perf_counter() - t, 1), "shards": args.shards}))
    config = str(ROOT / "configs" / "demo.yaml")
    load = os.getloadavg()[0]
    whole, checks, imports = [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", "--workspace", str(ws), "--config",
                               config, *OVERRIDES], cwd=ROOT, capture_output=True, text=True)
        whole.append(time.perf_counter() - t)
        if proc.returncode != 0:
            sys.exit(proc.stderr[-2000:])
        out = subprocess.run([sys.executable, "-c", CHECKS.format(root=str(ROOT), config=config, overrides=OVERRIDES,
                                                                  ws=str(ws))],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        data = json.loads(out.strip().splitlines()[-1])
        checks.append(data["checks_s"])
        imports.append(data["imports_s"])
    states = data["states"]
    for name, values in (("mcn_status_s", whole), ("lineage_checks_s", checks), ("imports_and_config_s", imports)):
        print(json.dumps({"figure": name, "median": round(statistics.median(values), 3), "min": round(min(values), 3),
                          "max": round(max(values), 3), "shards": args.shards, "fields": 4, "repeats": args.repeats,
                          "load_1min": round(load, 2)}))
    print(json.dumps({"figure": "states", "value": states}))
    print(proc.stdout)


if __name__ == "__main__":
    main()
