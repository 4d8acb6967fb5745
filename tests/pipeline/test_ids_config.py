import itertools

import pytest

from pipeline.config import Config, ConfigError, load_config
from pipeline.configtools import apply_overrides, from_dict, to_dict
from store.ids import path_of_id, video_id
from pipeline.ranks import owns, rank_and_world


@pytest.mark.parametrize(
    "rel, expected",
    [
        ("a.mp4", "a"),
        ("cooking/a.mp4", "cooking--a"),
        ("a-b.mp4", "a-2db"),
        ("My clip.v2.mp4", "My-20clip-2ev2"),
        ("dir/sub/x_y.mkv", "dir--sub--x_y"),
        ("é.mp4", "-c3-a9"),
    ],
)
def test_video_id_examples(rel, expected):
    vid = video_id(rel)
    assert vid == expected
    assert "." not in vid and "/" not in vid and " " not in vid
    assert path_of_id(vid) == rel.rsplit(".", 1)[0]


def test_video_ids_never_collide():
    names = ["a", "b", "a-b", "a/b", "a--b", "a_b", "a b", "a.b", "-", "--", "a/-b", "a-/b", "ü", "a/b/c", "a--b/c"]
    paths = [f"{n}.mp4" for n in names] + [f"x/{n}.mp4" for n in names]
    ids = [video_id(p) for p in paths]
    assert len(set(ids)) == len(ids)
    for p, i in zip(paths, ids):
        assert path_of_id(i) == p[: -len(".mp4")]


def test_overrides_and_types(tmp_path):
    preset = tmp_path / "c.yaml"
    preset.write_text("scan:\n  shard_size: 8\n  extensions: [.mp4]\n")
    cfg = load_config(preset, ["scan.probe_workers=3", "scan.captions_file=caps.json", "scan.probe_timeout_s=5"])
    assert cfg.scan.shard_size == 8
    assert cfg.scan.extensions == [".mp4"]
    assert cfg.scan.probe_workers == 3
    assert cfg.scan.captions_file == "caps.json"
    assert cfg.scan.probe_timeout_s == 5.0 and isinstance(cfg.scan.probe_timeout_s, float)
    assert to_dict(from_dict(Config, to_dict(cfg))) == to_dict(cfg)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="scan.shard_sise"):
        load_config(None, ["scan.shard_sise=3"])
    with pytest.raises(ConfigError, match="scan.shard_size: expected an integer"):
        load_config(None, ["scan.shard_size=many"])
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["scan.shard_size"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("scan: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_rank_from_env_and_partition():
    assert rank_and_world({}) == (0, 1)
    assert rank_and_world({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert rank_and_world({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) == (3, 4)
    with pytest.raises(ValueError):
        rank_and_world({"RANK": "2", "WORLD_SIZE": "2"})
    for world in (1, 2, 3, 5):
        for i in range(50):
            assert sum(owns(i, r, world) for r in range(world)) == 1
    assert list(itertools.compress(range(6), [owns(i, 1, 2) for i in range(6)])) == [1, 3, 5]


@pytest.mark.parametrize("env, message", [
    ({"RANK": "1"}, "RANK is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "4"}, "WORLD_SIZE is set but RANK is not"),
    ({"SLURM_PROCID": "0"}, "SLURM_PROCID is set but SLURM_NTASKS is not"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "outside"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, "SLURM array task 3 without rank"),
    ({"SLURM_ARRAY_TASK_ID": "3"}, "SLURM array task 3 without rank"),
    ({"JOB_COMPLETION_INDEX": "2"}, "indexed-job pod 2 without RANK/WORLD_SIZE"),
])
def test_misconfigured_ranks_are_errors_not_rank_0_of_1(env, message):
    from pipeline.ranks import RankError

    with pytest.raises(RankError, match=message):
        rank_and_world(env)


def test_rank_variables_of_array_tasks():
    array = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert rank_and_world({**array, "RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)  # the launcher's mapping wins
    assert rank_and_world(array, partition=False) == (0, 1)  # dynamic claims need no partition
    assert rank_and_world({"JOB_COMPLETION_INDEX": "2"}, partition=False) == (0, 1)


def test_partial_nested_sections_keep_their_defaults():
    cfg = load_config(None, ["extract.text.options={weights: /x/w2v.bin}", "extract.video2d.options={batch_size: 2}"])
    assert cfg.extract.text.name == "word2vec" and cfg.extract.text.options == {"weights": "/x/w2v.bin"}
    assert cfg.extract.video2d.name == "resnet152_2d" and cfg.extract.video2d.options == {"batch_size": 2}
    cfg = load_config(None, ["extract.decode.size_2d=64"])
    assert cfg.extract.decode.size_2d == 64 and cfg.extract.decode.fps_3d == 24.0


def test_paper_preset_holds_the_reference_constants():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "paper.yaml")
    t = cfg.train
    assert (t.batch_size, t.data.n_pair, t.epochs, t.lr, t.warmup_steps) == (128, 32, 30, 1e-4, 5000)
    assert (t.model.embed_dim, t.model.video_dim, t.model.text_dim, t.model.n_mels) == (6144, 4096, 300, 40)
    assert (t.loss.margin, t.loss.cluster_weight, t.loss.recon_weight) == (0.001, 1.0, 50.0)
    assert (t.kmeans.k, t.kmeans.queue_batches, t.kmeans.queue_clips_per_video, t.kmeans.refit_every) == (256, 20, 16, 20)
    assert (t.data.min_time, t.data.audio_frames, t.data.max_words) == (10.0, 1000, 20)
    d = cfg.extract.decode
    assert (d.fps_2d, d.size_2d, d.fps_3d, d.size_3d, d.crop_3d, d.audio_rate) == (1.0, 224, 24.0, 112, 112, 16000)
    sets = {s.name: s for s in cfg.evaluate.sets}
    assert sets["youcook2"].audio_frames == 5120 and sets["msrvtt"].audio_frames == 3072
    assert sets["msrvtt"].n_total == 1000
    demo = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    assert demo.extract.allow_random_weights and demo.train.model.video_input_norm
