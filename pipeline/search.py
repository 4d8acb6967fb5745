"""`mcn search`: the workspace's search index as a unit of the runner, then the query.

The index (:class:`evaluation.search.SearchIndex`, in ``WS/cache/search``) is rebuilt exactly when its
lineage changed: the checkpoint's content, the features' fingerprint or the clip settings.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from pipeline.config import Config
from pipeline.runner import run_unit
from pipeline.stages import extract_stage, workers_for
from store.claims import Claim
from store.layout import Workspace
from store.lineage import (
    Lineage,
    UnitState,
    file_identity,
    fingerprint,
    read_record,
    remember_identity,
    unit_state,
    write_record,
)
from store.reader import open_features

logger = logging.getLogger(__name__)


def search_index(ws: Workspace, cfg: Config, checkpoint: Path, *, model=None):
    """The search index of ``ws`` for ``checkpoint``, from its cache when that is current."""
    from evaluation.clipset import ClipSetConfig
    from evaluation.search import CODE_VERSION, SearchIndex

    clip_cfg = ClipSetConfig()
    features = open_features(ws)
    previous = (read_record(ws.search_record) or {}).get("checkpoint")
    ident = file_identity(checkpoint, previous if isinstance(previous, dict) else None)
    lineage = Lineage(config=fingerprint(dataclasses.asdict(clip_cfg)), code=CODE_VERSION,
                      inputs={"checkpoint": ident["sha256"], "features": features.fingerprint})

    def state() -> UnitState:
        rec = read_record(ws.search_record)
        problems = [] if (ws.search_cache / "index.json").is_file() else ["index.json missing"]
        return unit_state(rec, lineage, problems if rec is not None else None)

    def work(claim: Claim, st: UnitState) -> SearchIndex:
        if st.status == "stale":
            logger.info("search index: %s; rebuilding", st.why())
        ws.search_record.unlink(missing_ok=True)
        index = SearchIndex.build(features, checkpoint, ws.search_cache, model=model, clip_config=clip_cfg,
                                  batch_size=cfg.evaluate.batch_size)
        claim.verify()
        write_record(ws.search_record, ws.search_unit, lineage, decoder=cfg.extract.decode.backend,
                     checkpoint=ident, n_clips=len(index))
        return index

    st, index = run_unit(workers_for(ws, cfg), ws.search_unit, state, work)
    if index is None:
        remember_identity(ws.search_record, st.record, "checkpoint", ident)
        index = SearchIndex.load(ws.search_cache, checkpoint, clip_config=clip_cfg, model=model)
        logger.info("search index: %d clips from %s", len(index), ws.search_cache)
    return index


def text_extractor(ws: Workspace, cfg: Config):
    """The text extractor the workspace's features were made with (queries must use the same)."""
    return extract_stage(ws, cfg).extractor("text")
