"""Step localization on fixture shards with a tiny MCN: per-second plumbing (audio windows shifted
inside the video, 30-word step texts), scores and recall recomputed independently, an engineered
model that must localize perfectly, missing videos."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.annotations import StepAnnotations, parse_crosstask_annotations, parse_crosstask_tasks
from evaluation.localization import ordered_step_assignment
from evaluation.steps import (
    StepsConfig,
    audio_windows,
    embed_task_steps,
    localize,
    per_second_video,
    step_text_extractor,
    window_start,
)
from model.mcn import MCN, MCNConfig
from store.layout import Workspace
from store.reader import open_features
from tests.model.conftest import D2, D3, DW, FIELDS, N_MELS, FakeVideo, l2rows, write_shard

VOCAB = ["pour", "milk", "stir", "add", "sugar", "crack", "eggs", "fry", "alpha", "beta", "gamma"]
TASKS = {"101": ("pour milk", "stir", "add sugar"), "202": ("crack eggs", "xyzzy plugh", "fry")}


def tiny_config() -> MCNConfig:
    return MCNConfig(embed_dim=32, video_dim=D2 + D3, text_dim=DW, n_mels=N_MELS, davenet_dim=32,
                     davenet_widths=(8, 8, 16, 16, 32), recon_dim=16)


@pytest.fixture(scope="module")
def w2v_options(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Options of the real word2vec extractor on a tiny vocabulary (captions: 20 words, the default);
    alpha/beta/gamma are the one-hot e0/e1/e2."""
    from gensim.models import KeyedVectors

    table = np.random.default_rng(5).standard_normal((len(VOCAB), DW)).astype(np.float32)
    for i, w in enumerate(("alpha", "beta", "gamma")):
        table[VOCAB.index(w)] = np.eye(DW, dtype=np.float32)[i]
    kv = KeyedVectors(vector_size=DW)
    kv.add_vectors(VOCAB, table)
    path = tmp_path_factory.mktemp("w2v") / "vectors.txt"
    kv.save_word2vec_format(str(path), binary=False)
    return {"weights": str(path), "binary": False}


@pytest.fixture(scope="module")
def extractor(w2v_options: dict):
    """The step texts' extractor: the caption extractor re-made to keep 30 words."""
    return step_text_extractor("word2vec", w2v_options, StepsConfig())


def fake(key: str, rng: np.random.Generator, seconds: int, audio_frames: int | None,
         fps_3d: float = 1.5) -> FakeVideo:
    """A video of ``seconds`` 2D rows, ``fps_3d`` 3D rows per second and ``audio_frames`` log-mel rows."""
    v2 = l2rows(np.abs(rng.standard_normal((seconds, D2))))
    v3 = l2rows(np.abs(rng.standard_normal((int(seconds * fps_3d), D3))))
    audio = None
    if audio_frames is not None:
        audio = (rng.standard_normal((audio_frames, N_MELS)) * 10 - 40).astype(np.float16)
    caps = [{"start": 0.0, "end": 2.0, "text": "pour milk"}]
    v = FakeVideo(key=key, duration=float(seconds), captions=caps, video2d=v2, video3d=v3, audio=audio,
                  words=np.zeros((1, 20, DW), np.float16), lengths=np.ones(1, np.int32))
    if audio is None:
        v.status["audio"] = "no_audio"
    return v


def write_tasks(path: Path, tasks: dict[str, tuple[str, ...]]) -> Path:
    blocks = [f"{tid}\nTask {tid}\nhttp://x/{tid}\n{len(steps)}\n{','.join(steps)}"
              for tid, steps in tasks.items()]
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def write_annotations(folder: Path, rows: dict[tuple[str, str], list[tuple[int, float, float]]]) -> Path:
    """(task, video) -> [(0-based step, start, end)] written as CrossTask csv files (1-based steps)."""
    folder.mkdir(parents=True, exist_ok=True)
    for (task, video), segs in rows.items():
        (folder / f"{task}_{video}.csv").write_text("".join(f"{s + 1},{a},{b}\n" for s, a, b in segs))
    return folder


# ------------------------------------------------------------------------- independent reference


def ref_inputs(v: FakeVideo, fps_3d: float = 1.5, audio_rate: float = 100.0
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per second: video (T, 32), audio windows (T, 40, 1024), frames (T,), written from the
    definition: 3D rows i whose span [i/fps, (i+1)/fps) meets [t, t+1); audio frames of the 8 s
    [t - 4, t + 4] moved to start at 0 or to end at T (at 100/s: 800 frames [100t - 400, 100t + 400)
    in the middle of the video), zero-padded to 1024."""
    t_len = v.video2d.shape[0]
    window = round(8 * audio_rate)
    video = np.zeros((t_len, D2 + D3), np.float32)
    audio = np.zeros((t_len, N_MELS, 1024), np.float32)
    frames = np.zeros(t_len, np.int64)
    for t in range(t_len):
        x2 = v.video2d[t].astype(np.float32)
        rows = [i for i in range(len(v.video3d)) if i / fps_3d < t + 1 and (i + 1) / fps_3d > t]
        x3 = v.video3d[rows].astype(np.float32).max(axis=0)
        video[t] = np.concatenate([x2 / np.linalg.norm(x2), x3 / np.linalg.norm(x3)])
        if v.audio is not None:
            lo = round(audio_rate * (t - 4))
            if lo < 0:
                lo = 0
            elif lo + window > round(audio_rate * t_len):
                lo = max(0, round(audio_rate * t_len) - window)
            hi = min(len(v.audio), lo + window)
            if hi > lo:
                audio[t, :, : hi - lo] = v.audio[lo:hi].T
                frames[t] = hi - lo
    return video, audio, frames


def ref_scores(model: MCN, v: FakeVideo, step_words: np.ndarray, **rates: float) -> np.ndarray:
    video, audio, frames = ref_inputs(v, **rates)
    ve = model.embed_video(torch.from_numpy(video)).numpy().astype(np.float64)
    te = model.embed_text(torch.from_numpy(step_words)).numpy().astype(np.float64)
    scores = ve @ te.T
    if frames.any():
        ae = model.embed_audio(torch.from_numpy(audio), torch.from_numpy(frames).clamp(min=1)).numpy()
        scores += (frames > 0)[:, None] * (ae.astype(np.float64) @ te.T)
    return scores


def ref_predictions(model: MCN, v: FakeVideo, steps: tuple[str, ...], extractor,
                    mining_youtube: bool, **rates: float) -> list[int]:
    words, lengths = extractor(list(steps))
    known = lengths > 0
    pred = np.full(len(steps), -1)
    pred[known] = ordered_step_assignment(ref_scores(model, v, words[known], **rates),
                                          mining_youtube=mining_youtube)
    return pred.tolist()


def ref_video_recall(pred: list[int], segs: list[tuple[int, float, float]]) -> float:
    steps = sorted({s for s, _, _ in segs})
    hits = sum(any(s == step and pred[step] >= 0 and math.floor(a) <= pred[step] < math.ceil(b)
                   for s, a, b in segs) for step in steps)
    return hits / len(steps)


# ----------------------------------------------------------------------------------------- tests


def test_per_second_rows_and_audio_windows() -> None:
    rng = np.random.default_rng(1)
    v2 = l2rows(np.abs(rng.standard_normal((5, 4))))
    v3 = l2rows(np.abs(rng.standard_normal((6, 3))))  # 1.5 rows/s would be 7.5: the last second has none
    out = per_second_video(v2, v3, fps_3d=1.5)
    assert out.shape == (5, 7) and out.dtype == np.float32
    for t, rows in enumerate([[0, 1], [1, 2], [3, 4], [4, 5], [5]]):  # t = 4 falls back on the last row
        x3 = v3[rows].astype(np.float32).max(axis=0)
        np.testing.assert_allclose(out[t, 4:], x3 / np.linalg.norm(x3), rtol=1e-6)
        np.testing.assert_allclose(out[t, :4], v2[t] / np.linalg.norm(v2[t].astype(np.float32)), rtol=1e-3)
        assert np.linalg.norm(out[t, :4]) == pytest.approx(1.0, abs=1e-6)



def ramp(n: int) -> np.ndarray:
    """(n, N_MELS) log-mel frames where frame i holds the value i (exact in float16 below 2048)."""
    return np.tile(np.arange(n, dtype=np.float16)[:, None], (1, N_MELS))


def assert_windows(windows: np.ndarray, frames: np.ndarray, expected: list[tuple[int, int]]) -> None:
    """Window i holds frames [lo, hi) of the ramp, then zeros up to 1024."""
    assert frames.tolist() == [hi - lo for lo, hi in expected]
    for i, (lo, hi) in enumerate(expected):
        np.testing.assert_array_equal(windows[i, 7, : hi - lo], np.arange(lo, hi))
        assert not windows[i, :, hi - lo :].any()


def test_audio_windows_are_shifted_inside_the_video_and_padded_to_1024() -> None:
    cfg = StepsConfig()
    assert (cfg.audio_window_s, cfg.audio_frames, cfg.max_words) == (8.0, 1024, 30)
    # A 10 s video with 10 s of audio at 100 frames/s. [t-4, t+4]: t=0 would start at -4 → [0, 8 s);
    # t=5 → [1, 9 s); t=6 would end at 10 → [2, 10 s); t=9 would end at 13 → [2, 10 s) as well.
    windows, frames = audio_windows(ramp(1000), np.array([0, 2, 5, 6, 9]), 10, 100.0, cfg)
    assert windows.shape == (5, N_MELS, 1024) and windows.dtype == np.float16
    assert_windows(windows, frames, [(0, 800), (0, 800), (100, 900), (200, 1000), (200, 1000)])
    # audio longer than the video: the window still ends at the video's end (10 s), not the audio's
    windows, frames = audio_windows(ramp(1200), np.array([9]), 10, 100.0, cfg)
    assert_windows(windows, frames, [(200, 1000)])
    # audio ending before the video (9 s of 10): the last window keeps the frames there are
    windows, frames = audio_windows(ramp(900), np.array([0, 9]), 10, 100.0, cfg)
    assert_windows(windows, frames, [(0, 800), (200, 900)])
    # a 5 s video (shorter than the window): every second takes [0, 8 s) of what there is
    windows, frames = audio_windows(ramp(500), np.array([0, 4]), 5, 100.0, cfg)
    assert_windows(windows, frames, [(0, 500), (0, 500)])
    # at 50 frames/s the window is 400 frames, padded to 1024: t=7 of 10 → [2, 10 s) = [100, 500)
    windows, frames = audio_windows(ramp(500), np.array([3, 7]), 10, 50.0, cfg)
    assert windows.shape == (2, N_MELS, 1024)
    assert_windows(windows, frames, [(0, 400), (100, 500)])
    assert [window_start(t, 8.0, 10.0) for t in (0, 4, 5, 6, 9)] == [0.0, 0.0, 1.0, 2.0, 2.0]


def test_step_texts_keep_30_words(w2v_options: dict) -> None:
    # 35 known words: the first 30 (no "gamma" among them), then 5 times "gamma"
    first = [VOCAB[i % 8] for i in range(30)]
    text = " ".join(first + ["gamma"] * 5)
    captions = step_text_extractor("word2vec", {**w2v_options, "max_words": 20}, StepsConfig())
    words, lengths = captions([text])
    assert words.shape == (1, 30, DW) and lengths.tolist() == [30]  # the caption cut (20) is replaced
    table = create_table(w2v_options)
    np.testing.assert_array_equal(words[0], np.stack([table[w] for w in first]))

    # embed_task_steps cuts to max_words even when the extractor gives more rows
    wide = step_text_extractor("word2vec", w2v_options, StepsConfig(max_words=40))
    torch.manual_seed(2)
    model = MCN(tiny_config())
    ts = embed_task_steps(model, wide, (text,))
    kept = torch.from_numpy(np.stack([table[w] for w in first])[None])
    np.testing.assert_allclose(ts.emb, model.embed_text(kept).numpy(), rtol=1e-5, atol=1e-6)
    all35 = torch.from_numpy(np.stack([table[w] for w in first + ["gamma"] * 5])[None])
    assert not np.allclose(model.embed_text(all35).numpy(), ts.emb)  # the 5 extra words would matter


def create_table(options: dict) -> dict[str, np.ndarray]:
    """word -> vector, read back from the fixture's word2vec text file."""
    lines = Path(options["weights"]).read_text().splitlines()[1:]
    return {w: np.array(vec, dtype=np.float32) for w, *vec in (line.split() for line in lines)}


@pytest.fixture(scope="module")
def crosstask(tmp_path_factory: pytest.TempPathFactory):
    """Shards: A (task 101, audio), B (101, no audio), C (202, audio shorter than the video, no
    captions), D (202, failed), E (not annotated). Annotated but absent: ghost (101)."""
    root = tmp_path_factory.mktemp("ct")
    rng = np.random.default_rng(7)
    a, b = fake("vid-A", rng, 20, 2000), fake("vid-B", rng, 15, None)
    c, e = fake("vid-C", rng, 12, 500), fake("vid-E", rng, 10, 1000)
    c.status["text"], c.words, c.lengths, c.captions = "no_captions", None, None, []
    d = FakeVideo(key="vid-D", status={f: "failed" for f in FIELDS})
    ws = Workspace(root / "ws")
    write_shard(ws, 0, [a, b, c])
    write_shard(ws, 1, [d, e])
    return root, {v.key: v for v in (a, b, c, d, e)}


def test_localize_matches_independent_computation(crosstask, extractor) -> None:
    root, videos = crosstask
    torch.manual_seed(0)
    model = MCN(tiny_config())
    task_of = {"vid-A": "101", "vid-B": "101", "vid-C": "202", "vid-D": "202", "ghost": "101"}
    pred = {k: ref_predictions(model, videos[k], TASKS[task_of[k]], extractor, False)
            for k in ("vid-A", "vid-B", "vid-C")}
    assert pred["vid-C"][1] == -1  # "xyzzy plugh" has no known word

    def hit(p: int) -> tuple[float, float]:
        return p + 0.2, p + 0.8  # contains second p only

    def miss(p: int, t_len: int) -> tuple[float, float]:
        q = p + 2 if p + 2 < t_len else p - 2
        return float(q), q + 1.0

    pa, pb, pc = pred["vid-A"], pred["vid-B"], pred["vid-C"]
    rows = {
        ("101", "vid-A"): [(0, *hit(pa[0])), (1, *miss(pa[1], 20)), (2, *hit(pa[2]))],  # 2/3
        ("101", "vid-B"): [(0, *hit(pb[0])), (1, *miss(pb[1], 15))],  # 1/2
        ("202", "vid-C"): [(0, *hit(pc[0])), (1, 3.0, 9.0), (2, *hit(pc[2]))],  # 2/3: step 2 never placed
        ("202", "vid-D"): [(0, 1.0, 2.0)],
        ("101", "ghost"): [(0, 1.0, 2.0)],
    }
    tasks = parse_crosstask_tasks(write_tasks(root / "tasks_primary.txt", TASKS))
    ann = parse_crosstask_annotations(write_annotations(root / "annotations", rows), tasks=tasks.tasks)
    assert ann.problems == []

    res = localize(model, open_features(Workspace(root / "ws")), ann, extractor)
    assert res["predictions"] == pred
    assert res["per_task"] == pytest.approx({"101": (2 / 3 + 1 / 2) / 2, "202": 2 / 3})
    assert res["recall"] == pytest.approx(((2 / 3 + 1 / 2) / 2 + 2 / 3) / 2)  # 0.625
    assert res["per_task_videos"] == {"101": 2, "202": 1}
    assert (res["n_videos"], res["n_annotated"], res["n_missing_features"]) == (3, 5, 2)
    assert (res["n_no_audio"], res["n_unknown_steps"], res["n_without_steps"]) == (1, 1, 0)
    problems = "\n".join(res["problems"])
    assert "xyzzy plugh" in problems and "no known word" in problems
    assert "ghost" in problems and "vid-D (video2d status 'failed')" in problems
    assert "vid-E" not in problems

    # Mining YouTube: log-softmax over the (known) steps, recall averaged over videos
    my = localize(model, open_features(Workspace(root / "ws")), ann, extractor, mining_youtube=True)
    pred_my = {k: ref_predictions(model, videos[k], TASKS[task_of[k]], extractor, True) for k in pred}
    assert my["predictions"] == pred_my
    segs_of = {v: segs for (_, v), segs in rows.items()}
    expected = np.mean([ref_video_recall(pred_my[k], segs_of[k]) for k in pred])
    assert my["recall"] == pytest.approx(expected)
    assert list(my["per_task"]) == ["all"] and my["n_videos"] == 3


def test_localize_takes_the_rates_from_the_done_records(tmp_path: Path, extractor) -> None:
    """Features made at 3 rows/s (3D) and 50 frames/s (audio): localize reads the rates from the
    records, so it must match the reference computed at those rates, not at 1.5 and 100."""
    rng = np.random.default_rng(11)
    v = fake("vid-R", rng, 16, 16 * 50, fps_3d=3.0)
    ws = Workspace(tmp_path / "ws")
    write_shard(ws, 0, [v], rates={"video3d": 3.0, "audio": 50.0})
    features = open_features(ws)
    assert (features.rate("video3d"), features.rate("audio")) == (3.0, 50.0)
    torch.manual_seed(1)
    model = MCN(tiny_config())
    steps = TASKS["101"]
    expected = ref_predictions(model, v, steps, extractor, False, fps_3d=3.0, audio_rate=50.0)
    assert expected != ref_predictions(model, v, steps, extractor, False)  # the rates matter here
    ann = StepAnnotations(segments={"vid-R": [(0, 1.0, 2.0)]}, task_of={"vid-R": "101"},
                          task_steps={"101": steps})
    res = localize(model, features, ann, extractor)
    assert res["predictions"] == {"vid-R": expected} and res["problems"] == []


def engineered_model() -> MCN:
    """video emb ≈ video vector, text emb ≈ ReLU(word vector) in dims 0..7 (gates ≈ 1), audio = 0."""
    model = MCN(tiny_config())
    eye = torch.eye(32)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.GU_video.fc.weight.copy_(eye)
        model.GU_video.cg.fc.bias.fill_(30.0)
        model.text_pooling_caption.fc.weight[:DW, :DW] = torch.eye(DW)
        model.GU_text_captions.fc.weight.copy_(eye)
        model.GU_text_captions.cg.fc.bias.fill_(30.0)
    return model


def test_engineered_model_localizes_every_step(tmp_path: Path, extractor) -> None:
    """2D dim s lights up during step s: the per-second scores peak inside the ground truth."""
    rng = np.random.default_rng(3)
    v = fake("vid-X", rng, 14, 1400)
    base = np.zeros((14, D2))
    base[:, D2 - 1] = 1.0
    truth = {0: (2, 4), 1: (6, 8), 2: (10, 12)}  # step -> seconds [a, b)
    for s, (a, b) in truth.items():
        base[a:b, s] = 3.0
    v.video2d = l2rows(base)
    ws = Workspace(tmp_path / "ws")
    write_shard(ws, 0, [v])
    model = engineered_model()
    scores = ref_scores(model, v, extractor(["alpha", "beta", "gamma"])[0])
    assert scores[2, 0] > 0.9 and scores[2, 1] == pytest.approx(0.0, abs=1e-6)  # the engineering holds
    ann = StepAnnotations(
        segments={"vid-X": [(s, float(a), float(b)) for s, (a, b) in truth.items()]},
        task_of={"vid-X": "9"}, task_steps={"9": ("alpha", "beta", "gamma")},
    )
    for mining_youtube in (False, True):
        res = localize(model, open_features(ws), ann, extractor, mining_youtube=mining_youtube)
        assert res["recall"] == 1.0 and res["n_videos"] == 1 and res["problems"] == []
        placed = res["predictions"]["vid-X"]
        assert [truth[s][0] <= p < truth[s][1] for s, p in enumerate(placed)] == [True] * 3


def test_no_video_found_and_task_without_steps(crosstask, extractor) -> None:
    root, _ = crosstask
    ann = StepAnnotations(segments={"nope": [(0, 1.0, 2.0)], "vid-A": [(0, 1.0, 2.0)]},
                          task_of={"nope": "101", "vid-A": "777"}, task_steps={"101": TASKS["101"]})
    res = localize(MCN(tiny_config()), open_features(Workspace(root / "ws")), ann, extractor)
    assert math.isnan(res["recall"]) and res["n_videos"] == 0
    assert (res["n_missing_features"], res["n_without_steps"]) == (1, 1)
    problems = "\n".join(res["problems"])
    assert "task 777: no step list" in problems and "nope" in problems
    assert "no annotated video could be evaluated" in problems
