"""Annotation parsers on tiny files written in tmp_path, malformed rows included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.annotations import (
    Clip,
    StepSegment,
    parse_crosstask_annotations,
    parse_crosstask_tasks,
    parse_mining_youtube,
    parse_msrvtt_test,
    parse_youcook2,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ YouCook2

YOUCOOK = {
    "database": {
        "vidA": {
            "subset": "validation",
            "annotations": [
                {"segment": [10, 20], "sentence": " crack two eggs ", "id": 0},
                {"segment": [30, 25], "sentence": "reversed", "id": 1},  # bad: end < start
                {"segment": [40, 50], "sentence": "", "id": 2},  # bad: empty sentence
                {"segment": [50], "sentence": "short", "id": 3},  # bad: not a pair
                {"segment": [55.5, 60], "sentence": "whisk", "id": 4},
            ],
        },
        "vidB": {"subset": "training", "annotations": [{"segment": [0, 5], "sentence": "x", "id": 0}]},
        "vidC": {"subset": "validation", "annotations": [{"segment": [1, 2], "sentence": "fry", "id": 7}]},
        "vidD": {"subset": "validation", "annotations": "oops"},  # bad: not a list
        "vidE": "not an object",  # bad
    }
}


def test_youcook2(tmp_path: Path) -> None:
    path = write(tmp_path / "youcookii_annotations_trainval.json", json.dumps(YOUCOOK))
    result = parse_youcook2(path)
    assert result.clips == [
        Clip("vidA_0", "vidA", "crack two eggs", 10.0, 20.0),
        Clip("vidA_4", "vidA", "whisk", 55.5, 60.0),
        Clip("vidC_7", "vidC", "fry", 1.0, 2.0),
    ]
    assert result.n_malformed == 5
    assert len(result.problems) == 5
    assert any("annotations[1]" in p and "reversed" in p for p in result.problems)
    assert any("vidE" in p for p in result.problems)


def test_youcook2_unknown_videos_and_subset(tmp_path: Path) -> None:
    path = write(tmp_path / "yc.json", json.dumps(YOUCOOK))
    result = parse_youcook2(path, video_ids={"vidA", "vidD"})
    assert [c.key for c in result.clips] == ["vidA_0", "vidA_4"]
    assert result.unknown_video_ids == ["vidC"]
    training = parse_youcook2(path, subset="training")
    assert training.clips == [Clip("vidB_0", "vidB", "x", 0.0, 5.0)]


def test_youcook2_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JSON"):
        parse_youcook2(write(tmp_path / "bad.json", "{not json"))
    with pytest.raises(ValueError, match="database"):
        parse_youcook2(write(tmp_path / "bad2.json", "[]"))


# ------------------------------------------------------------------------------------- MSR-VTT

MSRVTT_CSV = """key,vid_key,video_id,sentence
ret0,msr9770,video9770,a person is connecting something to system
ret1,msr7606,video7606,"a little girl does gymnastics, then smiles"
ret2,msr9180,video9180
ret3,msr7000,video7000,

ret4,msr7606,video7606,the same video again
ret5,msr9999,video9999,a man sings,extra field
ret6,msr1000,video1000,cooking show
"""


def test_msrvtt_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "MSRVTT_JSFUSION_test.csv", MSRVTT_CSV)
    result = parse_msrvtt_test(path, expected_count=None)
    assert result.clips == [
        Clip("ret0", "video9770", "a person is connecting something to system"),
        Clip("ret1", "video7606", "a little girl does gymnastics, then smiles"),  # quoted comma
        Clip("ret6", "video1000", "cooking show"),
    ]
    assert result.clips[0].start is None and result.clips[0].end is None  # whole clip
    # too few fields, empty sentence, repeated video, too many fields
    assert result.n_malformed == 4
    assert any(":4:" in p and "fields" in p for p in result.problems)  # reports the line number
    assert any("appears again" in p for p in result.problems)


def test_msrvtt_count_check_and_unknown_videos(tmp_path: Path) -> None:
    path = write(tmp_path / "test.csv", MSRVTT_CSV)
    result = parse_msrvtt_test(path, video_ids={"video9770", "video7606"})
    assert [c.video_id for c in result.clips] == ["video9770", "video7606"]
    assert result.unknown_video_ids == ["video1000"]
    assert any("expected 1000" in p for p in result.problems)
    with pytest.raises(ValueError, match="header"):
        parse_msrvtt_test(write(tmp_path / "nohead.csv", "a,b\n1,2\n"))


def test_msrvtt_json(tmp_path: Path) -> None:
    items = [
        {"video_id": "video1", "caption": "a dog runs"},
        {"video_id": "video2"},  # bad: no caption
        "junk",  # bad
        {"video_id": "", "caption": "no id"},  # bad
        {"video_id": "video3", "caption": "a cat sleeps"},
    ]
    path = write(tmp_path / "msrvtt_test.json", json.dumps(items))
    result = parse_msrvtt_test(path, expected_count=2)
    assert result.clips == [Clip("video1", "video1", "a dog runs"), Clip("video3", "video3", "a cat sleeps")]
    assert result.n_malformed == 3
    assert not any("expected" in p for p in result.problems)


# ----------------------------------------------------------------------------------- CrossTask

TASKS = """23521
Make Jello Shots
http://www.wikihow.com/Make-Jello-Shots
6
pour water,pour juice,pour jello powder,pour alcohol,stir mixture,pour mixture into cup

59684
Build Simple Floating Shelves
http://www.wikihow.com/Build-Simple-Floating-Shelves
3
cut shelf,assemble shelf,sand shelf

11111
Broken Task
http://example.com
4
one,two

22222
Bad Count
http://example.com
many
a,b
"""


def test_crosstask_tasks(tmp_path: Path) -> None:
    result = parse_crosstask_tasks(write(tmp_path / "tasks_primary.txt", TASKS.replace("\n", "\r\n")))
    assert list(result.tasks) == ["23521", "59684"]
    shelves = result.tasks["59684"]
    assert shelves.name == "Build Simple Floating Shelves"
    assert shelves.url == "http://www.wikihow.com/Build-Simple-Floating-Shelves"
    assert shelves.steps == ("cut shelf", "assemble shelf", "sand shelf")
    assert len(result.tasks["23521"].steps) == 6
    assert len(result.problems) == 2
    assert any("11111" in p and "4 steps announced, 2" in p for p in result.problems)


def test_crosstask_annotations(tmp_path: Path) -> None:
    tasks = parse_crosstask_tasks(write(tmp_path / "tasks_primary.txt", TASKS)).tasks
    ann = tmp_path / "annotations"
    write(ann / "59684_a_b-c_d.csv", "2,10.5,12.0\n1,3.0,7.25\n\n")  # video id with '_'
    write(ann / "23521_vidX.csv", "1,0,4\n7,5,6\nx,1,2\n3,9,8\n2,nan,3\n4,10\n6,20.0,25.5\n")
    write(ann / "99999_vidY.csv", "1,0,1\n")  # unknown task
    write(ann / "59684_vidZ.csv", "9,1,2\n")  # no valid row
    write(ann / "59684_vidW.csv", "1,1,2\n")
    write(ann / "README.txt", "not a csv")
    write(ann / "nounderscore.csv", "1,0,1\n")
    result = parse_crosstask_annotations(ann, tasks=tasks, video_ids={"a_b-c_d", "vidX", "vidZ"})
    assert result.segments == {
        "a_b-c_d": [StepSegment(0, 3.0, 7.25), StepSegment(1, 10.5, 12.0)],
        "vidX": [StepSegment(0, 0.0, 4.0), StepSegment(5, 20.0, 25.5)],
    }
    assert result.task_of == {"a_b-c_d": "59684", "vidX": "23521"}
    assert result.task_steps["59684"] == ("cut shelf", "assemble shelf", "sand shelf")
    assert result.unknown_video_ids == ["vidW"]
    # vidX: step 7 > 6, 'x', reversed, nan, 3 fields; vidZ: step 9 > 3; unknown task; bad file name
    assert result.n_malformed == 8
    assert any("23521_vidX.csv:2" in p and "outside 1..6" in p for p in result.problems)
    assert any("vidZ" in p and "no valid" in p for p in result.problems)
    # segments unpack as (step, start, end), the form crosstask_recall takes
    step, start, end = result.segments["vidX"][1]
    assert (step, start, end) == (5, 20.0, 25.5)


def test_crosstask_annotations_without_tasks(tmp_path: Path) -> None:
    ann = tmp_path / "annotations"
    write(ann / "99999_vidY.csv", "12,0,1\n0,1,2\n")
    result = parse_crosstask_annotations(ann)
    assert result.segments == {"vidY": [StepSegment(11, 0.0, 1.0)]}
    assert result.n_malformed == 1  # step 0 is not 1-based
    with pytest.raises(FileNotFoundError):
        parse_crosstask_annotations(tmp_path / "missing")


# ------------------------------------------------------------------------------ Mining YouTube


def test_mining_youtube(tmp_path: Path) -> None:
    tasks = write(
        tmp_path / "tasks.json",
        json.dumps({"pancake": ["Pour Milk", "stir", "fry"], "coffee": ["grind", "brew"], "bad": []}),
    )
    ann = tmp_path / "annotations"
    write(ann / "pancake" / "v1.csv", "step,start,end\npour milk,1,3\nSIL,3,5\n3,6,9\nflip,9,10\n2,x,1\n")
    write(ann / "coffee" / "v2.csv", "2,0.5,4\n1,4,3\n")
    write(ann / "coffee" / "v3.csv", "background,0,10\n")
    write(ann / "omelet" / "v4.csv", "1,0,1\n")  # task not in tasks.json
    result = parse_mining_youtube(tasks, ann, video_ids={"v1", "v2", "v3", "v4"})
    assert result.segments == {
        "v1": [StepSegment(0, 1.0, 3.0), StepSegment(2, 6.0, 9.0)],
        "v2": [StepSegment(1, 0.5, 4.0)],
    }
    assert result.task_of == {"v1": "pancake", "v2": "coffee"}
    assert result.task_steps == {"pancake": ("Pour Milk", "stir", "fry"), "coffee": ("grind", "brew")}
    # 'bad' task, unknown step 'flip', 'x' start, reversed interval, omelet folder
    assert result.n_malformed == 5
    assert any(p.startswith("pancake/v1.csv:5") and "flip" in p for p in result.problems)
    assert any("v3" in p and "no valid" in p for p in result.problems)  # only background
    only_v2 = parse_mining_youtube(tasks, ann, video_ids={"v2"})
    assert only_v2.unknown_video_ids == ["v3", "v1"]  # task folders in sorted order
