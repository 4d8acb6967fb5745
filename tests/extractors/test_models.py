"""Visual extractors, weights resolution and the registry.

Heavy models (ResNet-152, ResNeXt-101) are built a few times only, with random weights, and run on
tiny inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import extractors
from extractors import (
    MissingWeightsError,
    available,
    create,
    get_extractor,
    load_state_dict_file,
    resolve_weights,
    windows_from_frames,
)
from extractors.fold import fold_batchnorm, n_batchnorms
from extractors.precision import cpu_has_bf16
from extractors.weights import checkpoint_dir, seeded
from store.lineage import config_dict, fingerprint, sha256_file

FIXTURES = Path(__file__).parent / "fixtures"
HARA_KEYS = FIXTURES / "hara_resnext101_kinetics_keys.json"


@pytest.fixture(scope="module", autouse=True)
def _module_torch_home(tmp_path_factory: pytest.TempPathFactory):
    """Module-scoped models are built with an empty TORCH_HOME: no real weights leak in."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home_module")))
        yield


@pytest.fixture(autouse=True)
def _isolated_torch_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test sees its own empty TORCH_HOME."""
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def _shared_storage_copy(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Same keys/shapes/dtypes, values from one shared random storage (torch.save writes it once,
    keeping checkpoint files of 50M-parameter models a few MB)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(max(v.numel() for v in state.values()), generator=gen)
    out = {}
    for k, v in state.items():
        flat = base[: v.numel()]
        out[k] = flat.abs().add(0.5).view(v.shape) if "running_var" in k else flat.view(v.shape)
    return out


# --------------------------------------------------------------------------------------------- registry


def test_registry_lists_the_builtin_extractors() -> None:
    assert available() == ["hf_tokens", "logmel", "resnet152_2d", "resnext101_3d", "word2vec"]
    assert available("video2d") == ["resnet152_2d"]
    assert available("video3d") == ["resnext101_3d"]
    assert available("audio") == ["logmel"]
    assert available("text") == ["hf_tokens", "word2vec"]
    cls = get_extractor("resnext101_3d")
    assert (cls.field, cls.dim, cls.rate) == ("video3d", 2048, 1.5)
    assert (get_extractor("resnet152_2d").dim, get_extractor("resnet152_2d").rate) == (2048, 1.0)
    with pytest.raises(KeyError, match="resnet152_2d"):
        get_extractor("nope")
    with pytest.raises(ValueError):
        available("video")
    with pytest.raises(TypeError, match="batchsize"):
        create("resnet152_2d", {"batchsize": 3})


def test_register_rejects_bad_classes() -> None:
    class Bad(extractors.FeatureExtractor):
        name = "bad"
        field = "smell"
        version = "1"
        Config = extractors.ResNet152Config

        def __call__(self, batch):  # pragma: no cover
            return batch

    with pytest.raises(ValueError, match="smell"):
        extractors.register(Bad)
    assert "bad" not in available()


# --------------------------------------------------------------------------------------------- weights


def test_missing_weights_message_names_file_and_places(_isolated_torch_home: Path) -> None:
    with pytest.raises(MissingWeightsError) as err:
        resolve_weights(None, "resnet152-394f9c45.pth", allow_random=False)
    msg = str(err.value)
    expected = _isolated_torch_home / "hub" / "checkpoints" / "resnet152-394f9c45.pth"
    assert "resnet152-394f9c45.pth" in msg and str(expected) in msg
    assert isinstance(err.value, FileNotFoundError)
    # an explicit path is authoritative: also reported, and never replaced by random weights
    with pytest.raises(MissingWeightsError) as err2:
        resolve_weights("/nonexistent/dir/w.pth", "resnet152-394f9c45.pth", allow_random=True)
    assert "/nonexistent/dir/w.pth" in str(err2.value)
    # through an extractor: fails before building anything
    with pytest.raises(MissingWeightsError, match="resnext-101-kinetics.pth"):
        create("resnext101_3d")


def test_random_weights_warn_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="extractors.weights"):
        ref = resolve_weights(None, "x.pth", allow_random=True, seed=7)
    assert ref == extractors.WeightsRef(None, "random-init-seed7", True)
    assert any("RANDOM" in r.getMessage() and "x.pth" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="extractors.weights"):
        assert resolve_weights(None, "x.pth", allow_random=True, seed=7) == ref
    assert not caplog.records  # once per process, not at every description of the extractor


def test_weights_found_in_torch_home_and_explicit(tmp_path: Path) -> None:
    default = checkpoint_dir() / "w.pth"
    default.parent.mkdir(parents=True)
    default.write_bytes(b"abc")
    ref = resolve_weights(None, "w.pth", allow_random=False)
    assert ref.path == default and not ref.random
    assert ref.identity == hashlib.sha256(b"abc").hexdigest()
    other = tmp_path / "w.pth"
    other.write_bytes(b"different bytes")
    assert resolve_weights(str(other), "ignored.pth", allow_random=False).path == other
    assert resolve_weights(str(tmp_path), "w.pth", allow_random=False).path == other  # folder holding it
    # the identity cache follows file changes (size/mtime)
    other.write_bytes(b"changed again, longer")
    assert sha256_file(other) == hashlib.sha256(b"changed again, longer").hexdigest()


def test_seeded_is_deterministic_and_restores_global_rng() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with seeded(0):
        a = torch.randn(5)
    with seeded(1):
        b = torch.randn(5)
    with seeded(0):
        c = torch.randn(5)
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert torch.equal(torch.rand(3), expected_next)


def test_load_state_dict_file_unwraps_and_strips(tmp_path: Path) -> None:
    sd = {"a.weight": torch.arange(3.0), "b": torch.ones(2)}
    torch.save({"epoch": 3, "arch": "x", "state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "c.pth")
    torch.save(sd, tmp_path / "p.pth")
    for name in ("c.pth", "p.pth"):
        got = load_state_dict_file(tmp_path / name)
        assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    torch.save([1, 2], tmp_path / "bad.pth")
    with pytest.raises(ValueError):
        load_state_dict_file(tmp_path / "bad.pth")


# --------------------------------------------------------------------------------------------- 2D


@pytest.fixture(scope="module")
def r2d() -> extractors.ResNet152Extractor:
    # fold_bn off: the trunk as loaded, whose state dict is torchvision's (the folded one: test_fold_bn_*)
    return create("resnet152_2d", {"allow_random_weights": True, "seed": 0, "batch_size": 2, "device": "cpu",
                                   "fold_bn": False, "amp": "fp32"})


@pytest.fixture(scope="module")
def frames2d() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, size=(3, 40, 56, 3), dtype=np.uint8))


def test_resnet152_trunk_matches_torchvision(r2d, frames2d) -> None:
    with torch.device("meta"):
        tv = torchvision.models.resnet152()
    tv_shapes = {k: tuple(v.shape) for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    ours = {k: tuple(v.shape) for k, v in r2d.model.state_dict().items()}
    assert list(ours) == list(tv_shapes) and ours == tv_shapes
    assert r2d.weights_id == "random-init-seed0" and r2d.random_weights
    # the same random weights in torchvision's model with fc = Identity, preprocessing done here
    tv.fc = torch.nn.Identity()
    tv = tv.to_empty(device="cpu")
    tv.load_state_dict(r2d.model.state_dict(), strict=True)
    tv.eval()
    x = frames2d.numpy().astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]) / np.array(
        [0.229, 0.224, 0.225], np.float32
    )[:, None, None]
    with torch.no_grad():
        ref = tv(torch.from_numpy(x))
    ref = ref / ref.norm(dim=1, keepdim=True)
    out = r2d(frames2d)  # 3 frames in batches of 2
    assert out.dtype == torch.float32 and out.shape == (3, 2048)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-3)
    assert not torch.allclose(out[0], out[1])
    np.testing.assert_array_equal(r2d(frames2d.numpy()).numpy(), out.numpy())  # numpy input accepted
    assert r2d(frames2d[:0]).shape == (0, 2048)
    with pytest.raises(ValueError):
        r2d(frames2d.float())


def test_resnet152_random_init_is_deterministic(r2d, frames2d) -> None:
    again = create("resnet152_2d", {"allow_random_weights": True, "seed": 0, "device": "cpu", "amp": "fp32",
                                    "fold_bn": False})
    assert torch.equal(again(frames2d[:2]), r2d(frames2d[:2]))


def test_resnet152_loads_torchvision_checkpoint(r2d, frames2d) -> None:
    with torch.device("meta"):
        tv = torchvision.models.resnet152()
    # torchvision's file layout: plain state dict with fc.*, no num_batches_tracked (old checkpoint)
    state = _shared_storage_copy(
        {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}, seed=1
    )
    path = checkpoint_dir() / "resnet152-394f9c45.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    ext = create("resnet152_2d", {"device": "cpu", "amp": False, "fold_bn": False})  # an old config's amp: false
    assert not ext.random_weights and ext.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()
    got = ext.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert ext.describe() == {
        "extractor": "resnet152_2d",
        "version": "1",
        "weights": ext.weights_id,
        "random_weights": False,
        "rate": 1.0,
        "dim": 2048,
        "precision": "fp32",
    }


# --------------------------------------------------------------------------------------------- 3D


def _hara_param_count() -> int:
    """ResNeXt-101 (32 groups, [3, 4, 23, 3], widths 128..1024, expansion 2, 400 classes), by hand."""
    total = 3 * 64 * 7**3 + 2 * 64  # conv1, bn1
    inplanes = 64
    for planes, blocks in zip((128, 256, 512, 1024), (3, 4, 23, 3)):
        out = 2 * planes
        for b in range(blocks):
            cin = inplanes if b == 0 else out
            total += cin * planes + planes * (planes // 32) * 27 + planes * out  # three convs
            total += 2 * (planes + planes + out)  # three BNs
            if b == 0:
                total += cin * out + 2 * out  # shortcut B
        inplanes = out
    return total + 2048 * 400 + 400


@pytest.fixture(scope="module")
def r3d() -> extractors.ResNeXt101Extractor:
    # fold_bn off: Hara's module as loaded, with its state dict and forward_features
    return create("resnext101_3d", {"allow_random_weights": True, "seed": 0, "batch_size": 1, "device": "cpu",
                                    "fold_bn": False, "amp": "fp32"})


def test_resnext101_matches_hara_keys_and_param_count(r3d) -> None:
    fixture = json.loads(HARA_KEYS.read_text())
    expected = [(k, tuple(s)) for k, s in fixture["keys"]]
    ours = [(k, tuple(v.shape)) for k, v in r3d.model.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert ours == expected
    n_params = sum(p.numel() for p in r3d.model.parameters())
    assert n_params == _hara_param_count() == fixture["n_parameters"] == 48_340_816
    assert n_params - r3d.model.fc.weight.numel() - r3d.model.fc.bias.numel() == 47_521_216
    assert r3d.weights_id == "random-init-seed0"


def test_resnext101_forward_windows(r3d) -> None:
    rng = np.random.default_rng(1)
    windows = rng.integers(0, 256, size=(2, 16, 112, 112, 3), dtype=np.uint8)
    out = r3d(torch.from_numpy(windows))  # batch_size 1 → two chunks
    assert out.shape == (2, 2048) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-3)
    assert not torch.allclose(out[0], out[1])
    # independent preprocessing: (3, 16, 112, 112), 0–255 minus the Kinetics mean, std 1; the second
    # window (second chunk) only, to keep the test cheap
    x = windows[1:].astype(np.float32).transpose(0, 4, 1, 2, 3) - np.array([110.6, 103.2, 96.3], np.float32)[
        :, None, None, None
    ]
    with torch.no_grad():
        ref = F.normalize(r3d.model.forward_features(torch.from_numpy(np.ascontiguousarray(x))), dim=1)
    torch.testing.assert_close(out[1:], ref, rtol=1e-4, atol=1e-5)
    assert r3d(torch.zeros(0, 16, 112, 112, 3, dtype=torch.uint8)).shape == (0, 2048)
    with pytest.raises(ValueError):
        r3d(torch.zeros(1, 8, 112, 112, 3, dtype=torch.uint8))


def test_resnext101_random_init_is_deterministic(r3d) -> None:
    again = create("resnext101_3d", {"allow_random_weights": True, "seed": 0, "device": "cpu", "fold_bn": False})
    a, b = again.model.state_dict(), r3d.model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resnext101_loads_hara_checkpoint(r3d, tmp_path: Path) -> None:
    state = _shared_storage_copy(
        {k: v for k, v in r3d.model.state_dict().items() if not k.endswith("num_batches_tracked")}, seed=2
    )
    ckpt = {
        "epoch": 200,
        "arch": "resnext-101",
        "state_dict": {"module." + k: v for k, v in state.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1]}]},
    }
    path = tmp_path / "resnext-101-kinetics.pth"
    torch.save(ckpt, path)
    ext = create("resnext101_3d", {"weights": str(path), "device": "cpu", "fold_bn": False})
    assert not ext.random_weights and ext.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()
    got = ext.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert torch.equal(got["fc.weight"], state["fc.weight"])


@pytest.mark.parametrize("name", ["resnet152_2d", "resnext101_3d"])
def test_fold_bn_gives_the_features_of_the_trunk_as_loaded(name, r2d, r3d, frames2d) -> None:
    """The default (fold_bn) runs a graph with no BatchNorm left whose features equal, to float32
    rounding, those of the same weights run as loaded (which the tests above check against torchvision's
    ResNet-152 and Hara's layout); fold_bn is part of the fingerprint, amp is not."""
    ref, x = (r2d, frames2d) if name == "resnet152_2d" else (
        r3d, torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 16, 112, 112, 3), dtype=np.uint8)))
    assert n_batchnorms(ref.model) > 0
    folded = create(name, {"allow_random_weights": True, "seed": 0, "device": "cpu", "amp": "fp32"})
    assert folded.config.fold_bn and n_batchnorms(folded.model) == 0
    n_convs = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) for m in folded.model.modules())
    assert n_convs == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) for m in ref.model.modules())
    got, want = folded(x), ref(x)
    assert got.shape == want.shape == (len(x), 2048)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.equal(got, want)  # folded: other float32 roundings, hence other bytes
    fp = {fold: fingerprint(config_dict(type(folded.config)(fold_bn=fold))) for fold in (True, False)}
    assert fp[True] != fp[False]
    assert fingerprint(config_dict(type(folded.config)(amp="bf16"))) == fp[True]


def test_fold_batchnorm_refuses_a_training_module() -> None:
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(module)
    folded = fold_batchnorm(module.eval())
    assert n_batchnorms(folded) == 0


def test_build_with_state_skips_the_init_and_owns_its_tensors() -> None:
    """A model built on the meta device takes every tensor from the state dict, each in its own float32
    storage (a checkpoint packed in one shared storage, or in float16, gives independent float32
    parameters); a buffer the state dict cannot give is an error, not a meta tensor left behind."""
    from extractors.weights import build_with_state

    def build() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))

    ref = build().eval()
    state = _shared_storage_copy({k: v for k, v in ref.state_dict().items() if "num_batches" not in k}, seed=5)
    state["0.bias"] = state["0.bias"].half()
    model = build_with_state(build, state).eval()
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert model[0].bias.dtype == torch.float32 and model[1].num_batches_tracked.item() == 0
    ref.load_state_dict(state)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert len(ptrs) == len(list(model.parameters()))  # no two parameters share memory
    with torch.no_grad():
        model[0].weight.zero_()
    assert model[1].weight.abs().sum() > 0  # (they did share it in the file)

    class WithScratch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.register_buffer("scratch", torch.zeros(2), persistent=False)

    with pytest.raises(ValueError, match="scratch"):
        build_with_state(WithScratch, WithScratch().state_dict())


def test_windows_from_frames() -> None:
    frames = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 112, 112, 3)
    w = windows_from_frames(frames)
    assert w.shape == (2, 16, 112, 112, 3)
    assert torch.equal(w[1, :, 0, 0, 0], torch.arange(16, 32, dtype=torch.uint8))
    assert windows_from_frames(frames[:15]).shape == (0, 16, 112, 112, 3)
    assert windows_from_frames(frames[:32]).shape == (2, 16, 112, 112, 3)
    wn = windows_from_frames(np.zeros((33, 112, 112, 3), np.uint8))
    assert isinstance(wn, np.ndarray) and wn.shape == (2, 16, 112, 112, 3)


# --------------------------------------------------------------------------------------------- bf16

# bf16 autocast vs float32 on real decoded footage (the testsrc2 clip), per-row cosine. The weights
# are random (no checkpoint here) with BatchNorm statistics re-estimated on the inputs, as trained
# weights would have them: with the init's statistics every row points the same way and any
# precision would pass. benchmarks/precision.py measures the same on longer footage.
BF16_MIN_COSINE = {"resnet152_2d": 0.90, "resnext101_3d": 0.90}  # measured: 0.95, see BENCHMARKS.md


def _calibrate_bn(ex, x: torch.Tensor) -> None:
    """Running mean/variance of every BatchNorm of ``ex.model`` re-estimated on ``x`` (one pass)."""
    for m in ex.model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    ex.model.train()
    with torch.no_grad():
        xb = ex.preprocess(x)
        ex.model.forward_features(xb) if hasattr(ex.model, "forward_features") else ex.model(xb)
    ex.model.eval()


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16 (AVX-512 bf16 / AMX)")
@pytest.mark.parametrize("name", ["resnet152_2d", "resnext101_3d"])
def test_bf16_rows_within_tolerance_of_fp32_on_real_footage(name: str, cfr_mp4: Path, tmp_path: Path) -> None:
    from extractors.decode import DecodeConfig, iter_visual

    chunks = list(iter_visual(cfr_mp4, DecodeConfig(size_2d=112)))
    if name == "resnet152_2d":
        x = torch.from_numpy(np.concatenate([c.frames_2d for c in chunks])[:3])  # 3 frames, 112 × 149
    else:
        x = torch.from_numpy(windows_from_frames(np.concatenate([c.frames_3d for c in chunks]))[:2])  # 2 windows
    calibrated = create(name, {"allow_random_weights": True, "seed": 0, "device": "cpu", "fold_bn": False})
    _calibrate_bn(calibrated, x)
    weights = tmp_path / "calibrated.pth"  # loaded as a weights file, then folded (the default path)
    torch.save(calibrated.model.state_dict(), weights)
    opts = {"weights": str(weights), "device": "cpu", "batch_size": 4}
    fp32, bf16 = create(name, {**opts, "amp": "fp32"}), create(name, {**opts, "amp": "bf16"})
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16") and fp32.config.fold_bn
    assert (fp32.describe()["precision"], bf16.describe()["precision"]) == ("fp32", "bf16")
    a, b = fp32(x), bf16(x)
    assert a.shape == b.shape == (len(x), 2048) and a.dtype == b.dtype == torch.float32
    assert not torch.equal(a, b)  # bf16 really ran
    cos = F.cosine_similarity(a.double(), b.double(), dim=1)
    assert cos.min().item() >= BF16_MIN_COSINE[name], cos.tolist()
    # the rows are not collapsed: bf16 keeps them apart as fp32 does
    assert F.cosine_similarity(a[:1].double(), a[1:2].double()).item() < cos.min().item()
