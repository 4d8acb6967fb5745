"""`mcn`: the command line of the pipeline (scan → extract → train → evaluate)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from pipeline.run import STAGES
from pipeline.terminal import print_lines, terminal_safe
from store.fields import FIELDS
from store.layout import Workspace

if TYPE_CHECKING:  # the config tree imports torch: loaded only once a command runs, never for --help
    from pipeline.config import Config

logger = logging.getLogger("mcn")

EPILOG = """Overrides: any config value as section.key=value after the options, e.g.
  mcn train --config configs/demo.yaml train.batch_size=64 train.lr=3e-4"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", "-w", type=Path, default=Path(os.environ.get("MCN_WORKSPACE", "workspace")),
                   help="workspace folder (default: $MCN_WORKSPACE or ./workspace)")
    p.add_argument("--config", "-c", type=Path, default=None, help="YAML preset, e.g. configs/demo.yaml")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (section.key=value)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcn",
        description="Multimodal Clustering Networks: learn a joint video-audio-text embedding from raw "
        "narrated videos. Stages: scan -> extract -> train -> evaluate; each is resumable and cached.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, help="print the version and git revision, then exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("scan", help="probe a videos folder into the manifest and shard plan",
                       description="Walk VIDEOS recursively (mp4, mkv, webm, avi, mov), probe each file with "
                       "ffprobe, find captions (side-car .srt/.vtt/.json or --captions FILE) and write "
                       "WS/manifest.jsonl, WS/scan.json and WS/captions/. Bad files are recorded as failed.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=Path, required=True, help="folder of raw videos")
    p.add_argument("--captions", type=Path, default=None,
                   help="HowTo100M-style caption file (JSON or CSV: video id -> start/end/text)")
    p.add_argument("--force", action="store_true", help="re-probe everything and re-plan the shards")
    _common(p)

    p = sub.add_parser("status", help="done / stale / missing for every stage, with the reasons",
                       description="The state of scan, extract (per field), train and evaluate (per set) for the "
                       "given config: done, stale (and why: config, code or inputs changed) or missing, and "
                       "the videos that failed. Cheap checks only (records, fingerprints, sizes) unless --verify.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verify", action="store_true",
                   help="also re-walk the videos folder and check every shard's checksum")
    _common(p)

    p = sub.add_parser("extract", help="extract 2D, 3D, audio and text features into webdataset shards",
                       description="Decode every scanned video (decord, worker processes) and write "
                       "WS/features/<field>/shard-NNNNNN.tar for the fields video2d (ResNet-152, 1/s), "
                       "video3d (ResNeXt-101 3D, 1.5/s), audio (log-mel, 100/s) and text (word vectors). "
                       "Done shards are skipped; a changed config redoes only the fields it affects. "
                       "Any number of processes may share a workspace: each shard is claimed by one. Static "
                       "claims (default) take the shards with index %% WORLD_SIZE == RANK; --claim dynamic "
                       "takes the next shard nobody holds, until every shard is done.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fields", nargs="+", choices=list(FIELDS), default=None,
                   help="only these fields (default: extract.fields of the config)")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="use seeded random visual backbones when no weights file is found (demo/tests only)")
    p.add_argument("--force", action="store_true", help="redo every shard of the selected fields")
    p.add_argument("--verify", action="store_true", help="also redo shards whose checksum differs from their record")
    p.add_argument("--retry-failed", action="store_true",
                   help="also redo the videos whose failure was transient (timeout, crashed worker, out of memory) "
                   "in shards that are done, keeping every other sample")
    p.add_argument("--claim", choices=["static", "dynamic"], default=None,
                   help="static: shards with index %% WORLD_SIZE == RANK; dynamic: the next unclaimed shard "
                   "(default: runner.mode of the config)")
    _common(p)

    p = sub.add_parser("demo-data", help="generate the synthetic narrated demo videos",
                       description="Seeded narrated videos of coloured shapes in motion (ffmpeg + espeak-ng) "
                       "with .srt side-cars: OUT/train/*.mp4 and OUT/heldout/*.mp4, whose held-out "
                       "colour/shape/motion combinations never occur in train. Re-runs skip finished videos.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: demo_data.out_dir)")
    p.add_argument("--videos", type=int, default=None, help="number of training videos")
    p.add_argument("--heldout", type=int, default=None, help="number of held-out videos")
    p.add_argument("--seed", type=int, default=None)
    _common(p)

    p = sub.add_parser("train", help="train the MCN heads on the extracted features",
                       description="Train MCN (MMS contrastive + online k-means clustering + reconstruction) on "
                       "WS/features into WS/runs/<name>/ (config.yaml, checkpoints/, logs/train.jsonl, TensorBoard). "
                       "Multi-GPU/multi-node: torchrun --nproc_per_node=N -m pipeline.cli train ... A run that is "
                       "done for this config and these features is not touched; an incomplete one continues "
                       "from its latest checkpoint; a run of another config or other features is trained "
                       "beside the old one (WS/runs/<name>-<fingerprint>), never over it.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default=None, help="run name (default: evaluate.run of the config, 'default')")
    p.add_argument("--resume", default=None,
                   help="a checkpoint path to continue from (default: the run's latest checkpoint, if any)")
    p.add_argument("--allow-new-data", action="store_true",
                   help="continue a checkpoint trained on other features (shards added or changed) with the "
                   "schedule recomputed for the current ones; a new run of the same config starts from the "
                   "latest checkpoint of the most recent earlier run of that name instead of from scratch")
    p.add_argument("--init-from", default=None,
                   help="start from these weights only (our checkpoint or the reference e{N}.pth)")
    _common(p)

    p = sub.add_parser("evaluate", help="zero-shot retrieval metrics and the report",
                       description="Embed an evaluation set's clips with a checkpoint and write "
                       "WS/eval/<set>/metrics.json, report.html and embeddings. Sets are configured under "
                       "evaluate.sets (kinds: captions, youcook2, msrvtt); 'workspace' uses the main "
                       "workspace's own captions; --videos DIR defines a captions set on the fly.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: latest of the run)")
    p.add_argument("--set", dest="set_name", default=None, help="evaluation set name (default: every configured set)")
    p.add_argument("--videos", type=Path, default=None, help="ad-hoc set: a folder of captioned videos")
    _common(p)

    p = sub.add_parser("search", help="rank every clip of a workspace for a text query",
                       description="Embed the query with the workspace's text extractor and the checkpoint, rank "
                       "every caption clip of the workspace by text·(video+audio) and print video, start-end and "
                       "score. Clip embeddings are cached in WS/cache/search/ and rebuilt only when the "
                       "checkpoint or the features change.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("query", help="free text, e.g. 'cut the onion'")
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: latest of the run)")
    p.add_argument("--top", type=int, default=10)
    _common(p)

    p = sub.add_parser("run", help="all stages in order (scan, extract, train, evaluate)",
                       description="scan -> extract -> train -> evaluate, redoing exactly what is stale: every "
                       "stage records what it was made from, so a change (config, code, a video) redoes the "
                       "units downstream of it and nothing else, and a re-run with nothing changed writes no "
                       "file. Killed at any point and run again with the same command, it finishes with the "
                       "same result.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=Path, required=True, help="folder of raw training videos")
    p.add_argument("--captions", type=Path, default=None, help="HowTo100M-style caption file")
    _run_options(p)
    _common(p)

    p = sub.add_parser("doctor", help="what a run of the config will use on this machine, and what is missing",
                       description="One table: ffmpeg/ffprobe, the decoders (and the selected one), torch, CUDA, "
                       "the GPUs and bf16 support, every weights file the config needs (where, sha256, "
                       "expected or not), free disk in the workspace and the rank variables. Exits 1 when a "
                       "stage of the config cannot run, naming what is missing and how to get it.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)

    p = sub.add_parser("demo", help="the CPU demo: demo-data, then `run` with configs/demo.yaml",
                       description="Generate the synthetic narrated videos (train + held-out split), train MCN "
                       "on the train split on CPU and evaluate zero-shot on the held-out split.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_options(p)
    _common(p)
    return parser


class _Version(argparse.Action):
    """``--version``: computed when asked (the git revision runs git), not when the parser is built."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from store.lineage import git_revision, package_version

        print(f"mcn {package_version()} (git {git_revision() or 'unknown: not a git checkout'})")
        parser.exit()


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="from_stage", choices=STAGES, default=None, help="start at this stage")
    p.add_argument("--only", choices=STAGES, default=None, help="run only this stage")
    p.add_argument("--force", choices=STAGES, action="append", default=[],
                   help="redo this stage from scratch (repeatable)")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="seeded random visual backbones when no weights file is found (demo/tests only)")
    p.add_argument("--claim", choices=["static", "dynamic"], default=None,
                   help="how extraction shares shards between processes (default: runner.mode)")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def cmd_scan(args: argparse.Namespace, cfg: Config, ws: Workspace) -> int:
    from pipeline.config import write_resolved
    from pipeline.scan import scan
    from pipeline.stages import workers_for

    if args.captions:
        cfg.scan.captions_file = str(args.captions)
    result = scan(args.videos, ws, cfg.scan, force=args.force, progress=not args.no_progress,
                  workers=workers_for(ws, cfg))
    write_resolved(ws.scan_config, cfg.scan, videos=str(args.videos.resolve()))
    how = "unchanged since the last scan" if result.up_to_date else f"{result.n_probed} probed, the rest cached"
    print(terminal_safe(f"scan: {result.n_videos} videos ({result.n_ok} ok, {result.n_failed} failed) in "
                        f"{result.n_shards} shards; {how} -> {ws.manifest}"))
    for path, why in result.failures:
        print(terminal_safe(f"  failed: {path}: {why}"))
    for path, why in result.skipped:
        print(terminal_safe(f"  skipped: {path}: {why}"))
    return 0


def cmd_status(args: argparse.Namespace, cfg: Config, ws: Workspace) -> int:
    from pipeline.status import print_status

    return print_status(ws, cfg, verify=args.verify)


def cmd_extract(args: argparse.Namespace, cfg: Config, ws: Workspace) -> int:
    from pipeline.stages import run_extract

    if args.fields:
        cfg.extract.fields = list(args.fields)
    if args.allow_random_weights:
        cfg.extract.allow_random_weights = True
    if args.claim:
        cfg.runner.mode = args.claim
    summary = run_extract(ws, cfg, force=args.force, progress=not args.no_progress, verify=args.verify,
                          retry_failed=args.retry_failed)
    done = ", ".join(f"{f} {n}" for f, n in summary.processed.items())
    others = sum(summary.by_others.values())
    retried = sum(summary.retried.values())
    print(f"extract: shards {summary.shards_mine}/{summary.shards_total} taken; written: {done}"
          + (f"; {others} written by other processes" if others else "")
          + (f"; {retried} failed video(s) retried" if retried else "")
          + f"; {summary.videos} videos in {summary.seconds:.1f} s")
    _print_failures(ws, cfg)
    return 0


def _print_failures(ws: Workspace, cfg: Config) -> None:
    from pipeline.stages import extract_states, failure_summary

    lines = failure_summary(extract_states(ws, cfg))
    if lines:
        print("failed videos by reason (`mcn status` lists them; --retry-failed redoes the transient ones):")
        for line in lines:
            print(terminal_safe(line))


def cmd_demo_data(args: argparse.Namespace, cfg: Config, ws: Workspace) -> int:
    from pipeline.demo_data import make_demo_data

    d = cfg.demo_data
    for attr, value in (("out_dir", args.out), ("n_videos", args.videos), ("n_heldout", args.heldout),
                        ("seed", args.seed)):
        if value is not None:
            setattr(d, attr, value)
    d.progress = not args.no_progress
    s = make_demo_data(d, cfg.runner)
    print(f"demo-data: {len(s.train_videos)} train + {len(s.heldout_videos)} held-out videos "
          f"({s.seconds_train + s.seconds_heldout:.0f} s of video; {s.n_generated} generated, "
          f"{s.n_skipped} already there) in {s.out_dir}")
    return 0


def cmd_train(args: argparse.Namespace, cfg: Config, ws: Workspace) -> int:
    from pipeline.training import run_train

    if args.name:
        cfg.evaluate.run = args.name
    result = run_train(ws, cfg, resume=args.resume, init_from=args.init_from, progress=not args.no_progress,
                       allow_new_data=args.allow_new_data)
    if result is not None:
        what = "" if result.trained else " (done already: nothing trained)"
        from model.train import LOSS_PARTS

        print(f"train: step {result.step}{what}; last losses "
              + ", ".join(f"{k} {v:.4f}" for k, v in sorted(result.losses.items()) if k in LOSS_PARTS)
              + f"; checkpoint {result.checkpoint}")
    return 0


def cmd_evaluate(args: argparse.Namespace, cfg: Config, ws: Workspace) -> int:
    from pipeline.evaluate import evaluate_set, format_table
    from pipeline.evalsets import EvalSetConfig

    names = [args.set_name] if args.set_name else [s.name for s in cfg.evaluate.sets] or ["workspace"]
    if args.videos is not None:
        name = args.set_name or args.videos.name
        cfg.evaluate.sets = [s for s in cfg.evaluate.sets if s.name != name]
        cfg.evaluate.sets.append(EvalSetConfig(name=name, videos=str(args.videos)))
        names = [name]
    for name in names:
        metrics = evaluate_set(ws, cfg, name, args.checkpoint, progress=not args.no_progress)
        cached = " (unchanged: nothing recomputed)" if metrics.get("cached") else ""
        if "localization" in metrics:
            loc = metrics["localization"]
            print(f"evaluate {name} ({metrics['kind']}): recall {100 * loc['recall']:.1f}% over "
                  f"{loc['n_videos']} videos{cached}; per task: "
                  + ", ".join(f"{t} {100 * r:.1f}%" for t, r in sorted(loc["per_task"].items())))
            for problem in metrics["problems"]:
                print(terminal_safe(f"  note: {problem}"))
            continue
        print(terminal_safe(f"evaluate {name}: {metrics['n_queries']} queries from {metrics['n_videos']} videos, "
                            f"checkpoint {metrics['checkpoint']}{cached}"))
        print(format_table(metrics))
        for problem in metrics["problems"]:
            print(terminal_safe(f"  note: {problem}"))
        print(terminal_safe(f"  report: {ws.eval_report(name)}"))
    return 0


def _run_setup(args: argparse.Namespace, cfg: Config) -> None:
    if args.allow_random_weights:
        cfg.extract.allow_random_weights = True
    if args.claim:
        cfg.runner.mode = args.claim


def cmd_run(args: argparse.Namespace, cfg: Config, ws: Workspace) -> int:
    from pipeline.run import run_pipeline

    if args.captions:
        cfg.scan.captions_file = str(args.captions)
    _run_setup(args, cfg)
    report = run_pipeline(ws, cfg, args.videos, from_stage=args.from_stage, only=args.only,
                          force=set(args.force), progress=not args.no_progress)
    print_lines(report)
    return 0


def cmd_demo(args: argparse.Namespace, cfg: Config, ws: Workspace) -> int:
    from pipeline.configtools import ConfigError
    from pipeline.demo_data import make_demo_data
    from pipeline.run import run_pipeline

    if args.config is None:
        raise ConfigError("mcn demo needs --config (make demo passes configs/demo.yaml)")
    _run_setup(args, cfg)
    cfg.demo_data.progress = not args.no_progress
    summary = make_demo_data(cfg.demo_data, cfg.runner)
    print(f"demo-data: {len(summary.train_videos)} train + {len(summary.heldout_videos)} held-out videos in "
          f"{summary.out_dir} ({summary.elapsed_s:.0f} s)")
    report = run_pipeline(ws, cfg, Path(summary.out_dir) / "train", from_stage=args.from_stage, only=args.only,
                          force=set(args.force), progress=not args.no_progress)
    print_lines(report)
    return 0


def cmd_doctor(args: argparse.Namespace, cfg: Config, ws: Workspace) -> int:
    from pipeline.doctor import diagnose, exit_code, format_report

    checks = diagnose(ws, cfg)
    print(format_report(checks))
    return exit_code(checks)


def cmd_search(args: argparse.Namespace, cfg: Config, ws: Workspace) -> int:
    from evaluation.search import search_text
    from model.checkpoint import load_mcn
    from pipeline.search import search_index, text_extractor
    from pipeline.training import current_checkpoint

    ckpt = current_checkpoint(ws, cfg, args.checkpoint)
    model = load_mcn(ckpt)
    index = search_index(ws, cfg, ckpt, model=model)
    try:
        hits = search_text(index, model, text_extractor(ws, cfg), args.query, args.top)
    except ValueError as exc:
        print(terminal_safe(f"mcn search: {exc}"), file=sys.stderr)
        return 1
    print(f"{'score':>8}  {'video':<40} {'start':>8} {'end':>8}  caption")
    for h in hits:  # captions and ids come from the data: no control character reaches the terminal
        print(terminal_safe(f"{h.score:8.3f}  {h.video_id:<40} {h.start:8.2f} {h.end:8.2f}  {h.caption}"))
    return 0


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that say what to do (a missing file, a bad value, a training that diverged): printed as
    one line. Anything else is a bug and keeps its traceback."""
    from model.train import TrainingDiverged
    from pipeline.configtools import ConfigError

    return (FileNotFoundError, ConfigError, ValueError, TimeoutError, TrainingDiverged)


COMMANDS = {"search": cmd_search, "run": cmd_run, "demo": cmd_demo, "train": cmd_train, "evaluate": cmd_evaluate,
            "scan": cmd_scan, "status": cmd_status, "extract": cmd_extract, "demo-data": cmd_demo_data,
            "doctor": cmd_doctor}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options that follow a positional (`mcn search "query" --top 3 a.b=1`),
    # which argparse cannot assign to a second positional: collect them here.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = list(args.overrides) + extra
    _setup_logging(args.verbose)
    from pipeline.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"mcn: config error: {exc}", file=sys.stderr)
        return 2
    ws = Workspace(args.workspace)
    handler = COMMANDS[args.command]
    try:
        return handler(args, cfg, ws)
    except Exception as exc:  # the errors a user can act on: one line (all of it with --verbose)
        if not isinstance(exc, _expected_errors()):
            raise
        if args.verbose:
            raise
        print(terminal_safe(f"mcn {args.command}: {exc}"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
