"""MCN network: reference state-dict layout, forward semantics, eval audio pooling, checkpoints."""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import MCN, MCNConfig, load_mcn, save_model_checkpoint
from model.checkpoint import atomic_torch_save, config_from_state_dict, load_checkpoint
from model.davenet import downsampled_length
from model.mcn import GatedEmbeddingUnit

REFERENCE_PARAMS = 223_776_770  # SPEC §7 "223,776,770 values": the parameters of the reference model
REFERENCE_BUFFERS = 19_480  # 22 BatchNorms: running mean/var (19,458 values) + 22 num_batches_tracked

SMALL = MCNConfig(
    embed_dim=64,
    video_dim=24,
    text_dim=12,
    n_mels=40,
    davenet_widths=(8, 8, 16, 16, 32),
    davenet_dim=32,
    recon_dim=16,
)


def spec_shapes(
    embed: int = 6144,
    video: int = 4096,
    words: int = 300,
    mels: int = 40,
    recon: int = 1024,
    widths: tuple[int, ...] = (128, 128, 256, 512, 1024),
    blocks: tuple[int, ...] = (2, 2, 2, 2),
    kernel: int = 9,
) -> dict[str, tuple[int, ...]]:
    """The reference state dict (SPEC §3 / §7), written out independently of model/."""
    s: dict[str, tuple[int, ...]] = {}

    def bn(p: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            s[f"{p}.{name}"] = (c,)
        s[f"{p}.num_batches_tracked"] = ()

    def linear(p: str, i: int, o: int) -> None:
        s[f"{p}.weight"] = (o, i)
        s[f"{p}.bias"] = (o,)

    bn("DAVEnet.batchnorm1", 1)
    s["DAVEnet.conv1.weight"] = (widths[0], 1, mels, 1)
    bn("DAVEnet.bn1", widths[0])
    c_in = widths[0]
    for stage, (c_out, n) in enumerate(zip(widths[1:], blocks), start=1):
        for b in range(n):
            p = f"DAVEnet.layer{stage}.{b}"
            s[f"{p}.conv1.weight"] = (c_out, c_in if b == 0 else c_out, 1, kernel)
            bn(f"{p}.bn1", c_out)
            s[f"{p}.conv2.weight"] = (c_out, c_out, 1, kernel)
            bn(f"{p}.bn2", c_out)
            if b == 0:
                s[f"{p}.downsample.0.weight"] = (c_out, c_in, 1, 1)
                bn(f"{p}.downsample.1", c_out)
        c_in = c_out
    audio = widths[-1]
    linear("DAVEnet_projection", audio, embed)
    linear("GU_audio.fc", audio, audio)
    linear("GU_audio.cg.fc", audio, audio)
    linear("GU_video.fc", video, embed)
    linear("GU_video.cg.fc", embed, embed)
    linear("text_pooling_caption.fc", words, embed)
    linear("GU_text_captions.fc", embed, embed)
    linear("GU_text_captions.cg.fc", embed, embed)
    for head, out in (("recon_v", video), ("recon_a", audio), ("recon_t", embed)):
        linear(f"{head}.0", embed, recon)
        linear(f"{head}.2", recon, out)
    return s


def small_shapes() -> dict[str, tuple[int, ...]]:
    return spec_shapes(embed=64, video=24, words=12, recon=16, widths=(8, 8, 16, 16, 32))


def is_buffer(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


# ---------------------------------------------------------------------------------------- layout
def test_spec_table_counts() -> None:
    shapes = spec_shapes()
    params = sum(math.prod(v) for k, v in shapes.items() if not is_buffer(k))
    buffers = sum(math.prod(v) for k, v in shapes.items() if is_buffer(k))
    assert params == REFERENCE_PARAMS
    assert buffers == REFERENCE_BUFFERS
    assert len(shapes) == 159


def test_full_size_layout_on_meta_loads_strict() -> None:
    with torch.device("meta"):
        model = MCN(MCNConfig())
    sd = model.state_dict()
    expected = spec_shapes()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS
    assert sum(v.numel() for v in sd.values()) == REFERENCE_PARAMS + REFERENCE_BUFFERS
    ref = {k: torch.empty(shape, device="meta", dtype=torch.long if k.endswith("tracked") else torch.float32)
           for k, shape in expected.items()}
    result = model.load_state_dict(ref, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert config_from_state_dict(ref) == MCNConfig()


@pytest.mark.slow
def test_full_size_model_real() -> None:
    """The only real full-size build: counts and embedding shapes."""
    torch.manual_seed(0)
    model = MCN()
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS
    assert sum(v.numel() for v in model.state_dict().values()) == REFERENCE_PARAMS + REFERENCE_BUFFERS
    emb = model.embed(torch.randn(2, 4096), torch.randn(2, 40, 1000), torch.tensor([1000, 300]), torch.randn(2, 20, 300))
    assert {k: tuple(v.shape) for k, v in emb.items()} == {k: (2, 6144) for k in ("video", "audio", "text")}
    assert all(torch.isfinite(v).all() for v in emb.values())


def test_small_layout_matches_spec_table() -> None:
    sd = MCN(SMALL).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == small_shapes()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="davenet_dim"):
        MCNConfig(davenet_dim=512)
    assert MCNConfig.from_dict({**asdict(SMALL), "future_field": 1}) == SMALL
    assert MCNConfig(davenet_widths=[128, 128, 256, 512, 1024]).davenet_widths == (128, 128, 256, 512, 1024)


# ---------------------------------------------------------------------------------------- forward
def inputs(b: int = 4, t: int = 1000, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(b, SMALL.video_dim, generator=g)
    audio = torch.randn(b, 40, t, generator=g)
    nframes = torch.tensor([t, t // 2, 37, 0][:b] + [t] * max(0, b - 4), dtype=torch.long)
    text = torch.randn(b, 20, SMALL.text_dim, generator=g)
    return video, audio, nframes, text


def test_forward_shapes_and_targets() -> None:
    torch.manual_seed(0)
    model = MCN(SMALL).train()
    video, audio, nframes, text = inputs()
    out = model(video, audio, nframes, text)
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {
        "video": (4, 64), "audio": (4, 64), "text": (4, 64), "fused": (4, 64),
        "recon_video": (4, 24), "target_video": (4, 24),
        "recon_audio": (4, 32), "target_audio": (4, 32),
        "recon_text": (4, 64), "target_text": (4, 64),
    }
    assert torch.equal(out["target_video"], video)
    torch.testing.assert_close(out["fused"], (out["video"] + out["audio"] + out["text"]) / 3)
    # Reconstructions are ReLU outputs; targets keep their graph (not detached, as the reference).
    assert (out["recon_video"] >= 0).all() and out["target_audio"].requires_grad and out["target_text"].requires_grad
    # Text: Linear → ReLU → max over all 20 slots.
    fc = model.text_pooling_caption.fc
    torch.testing.assert_close(out["target_text"], torch.relu(text @ fc.weight.T + fc.bias).max(dim=1).values)


def test_every_trainable_parameter_gets_a_gradient() -> None:
    """DDP (find_unused_parameters=False) needs this; the unused reference ``batchnorm1`` is frozen."""
    model = MCN(SMALL).train()
    out = model(*inputs())
    keys = ("video", "audio", "text", "recon_video", "recon_audio", "recon_text")
    torch.stack([out[k].sum() for k in keys]).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {
        "DAVEnet.batchnorm1.weight", "DAVEnet.batchnorm1.bias"}
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)


def test_text_padding_slots_take_part_in_the_max() -> None:
    model = MCN(SMALL)
    text = torch.zeros(2, 20, SMALL.text_dim)
    text[0, 0] = 1.0
    pooled = model._text_pooled(text)
    fc = model.text_pooling_caption.fc
    torch.testing.assert_close(pooled[1], torch.relu(fc.bias))  # all padding → ReLU(bias)
    torch.testing.assert_close(pooled[0], torch.maximum(torch.relu(fc.weight.sum(1) + fc.bias), torch.relu(fc.bias)))


def test_fused_with_audio_mask() -> None:
    model = MCN(SMALL).train()
    video, audio, nframes, text = inputs()
    mask = torch.tensor([True, False, True, False])
    out = model(video, audio, nframes, text, audio_mask=mask)
    v, a, t = out["video"], out["audio"], out["text"]
    torch.testing.assert_close(out["fused"][0], (v[0] + a[0] + t[0]) / 3)
    torch.testing.assert_close(out["fused"][1], (v[1] + t[1]) / 2)


def test_gated_unit_is_reference_glu() -> None:
    gu = GatedEmbeddingUnit(6, 5)
    x = torch.randn(3, 6)
    y = gu.fc(x)
    ref = F.glu(torch.cat((y, gu.cg.fc(y)), 1), 1)  # the reference Context_Gating
    torch.testing.assert_close(gu(x), ref)


def test_davenet_output_length() -> None:
    model = MCN(SMALL).eval()
    for t in (1000, 1001, 3072, 5120, 100, 16):
        feats = model.DAVEnet(torch.randn(1, 40, t))
        assert feats.shape == (1, 32, downsampled_length(t)), t
    assert downsampled_length(1000) == 63 and downsampled_length(5120) == 320


def test_training_audio_pools_all_steps() -> None:
    model = MCN(SMALL).train()
    video, audio, nframes, text = inputs()
    out = model(video, audio, nframes, text)
    torch.testing.assert_close(out["target_audio"], model.DAVEnet(audio).mean(dim=-1))


# ---------------------------------------------------------------------------------------- eval pooling
def trained_small(seed: int = 0) -> MCN:
    """A small model whose BN running statistics are not the defaults."""
    torch.manual_seed(seed)
    model = MCN(SMALL).train()
    for s in range(2):
        video, audio, nframes, text = inputs(seed=s + 10)
        model(video, audio * 3 + 1, nframes, text)
    return model.eval()


def manual_audio(model: MCN, audio: torch.Tensor, steps: list[int]) -> torch.Tensor:
    with torch.no_grad():
        feats = model.DAVEnet(audio)
        pooled = torch.stack([feats[i, :, : steps[i]].mean(-1) for i in range(audio.shape[0])])
        return model.DAVEnet_projection(model.GU_audio(pooled))


def test_eval_audio_pooling_uses_nframes_div_16() -> None:
    model = trained_small()
    audio = torch.randn(7, 40, 1000)
    nframes = torch.tensor([0, 5, 16, 31, 400, 1000, 5000])
    before = nframes.clone()
    got = model.embed_audio(audio, nframes)
    # T' = 63: steps = clamp(n // 16, 1, 63)
    expected = manual_audio(model, audio, [1, 1, 1, 1, 25, 62, 63])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(nframes, before)  # not divided in place (reference flaw)


def test_eval_pool_ratio_reference_rounding_and_override() -> None:
    model = trained_small()
    audio = torch.randn(1, 40, 100)  # T' = 7, reference ratio round(100 / 7) = 14
    n = torch.tensor([56])
    torch.testing.assert_close(model.embed_audio(audio, n), manual_audio(model, audio, [4]), rtol=1e-5, atol=1e-6)
    model.config.eval_pool_ratio = 16
    torch.testing.assert_close(model.embed_audio(audio, n), manual_audio(model, audio, [3]), rtol=1e-5, atol=1e-6)


def test_eval_embedding_ignores_padding_beyond_nframes() -> None:
    model = trained_small()
    audio = torch.randn(2, 40, 3000)
    nframes = torch.tensor([800, 640])  # 50 and 40 valid steps, receptive field ends well before 2000
    changed = audio.clone()
    changed[:, :, 2000:] = torch.randn(2, 40, 1000) * 5
    a0 = model.embed_audio(audio, nframes)
    a1 = model.embed_audio(changed, nframes)
    torch.testing.assert_close(a0, a1, rtol=0, atol=1e-6)
    model.train()  # training pools every step: the same change is visible
    video, _, _, text = inputs(2)
    with torch.no_grad():
        t0 = model(video, audio, nframes, text)["target_audio"]
        t1 = model(video, changed, nframes, text)["target_audio"]
    assert not torch.allclose(t0, t1)


# ---------------------------------------------------------------------------------------- modes
def test_embed_restores_modes_and_has_no_grad() -> None:
    model = MCN(SMALL).train()
    video, audio, nframes, text = inputs()
    emb = model.embed(video, audio, nframes, text)
    assert model.training and all(m.training for m in model.modules())
    assert {k: tuple(v.shape) for k, v in emb.items()} == {k: (4, 64) for k in ("video", "audio", "text")}
    assert not any(v.requires_grad for v in emb.values())
    model.DAVEnet.eval()  # mixed modes survive too
    model.embed_text(text)
    assert model.training and not model.DAVEnet.training and model.GU_video.training
    model.eval()
    model.embed_video(video)
    assert not model.training
    model.train()
    with pytest.raises(ValueError):
        model.embed_text(torch.randn(2, 20, 5))  # wrong word dim
    assert model.training


def test_embed_equals_eval_forward() -> None:
    model = trained_small()
    video, audio, nframes, text = inputs()
    emb = model.embed(video, audio, nframes, text)
    with torch.no_grad():
        out = model(video, audio, nframes, text)
    for k in ("video", "audio", "text"):
        torch.testing.assert_close(emb[k], out[k])


# ---------------------------------------------------------------------------------------- checkpoints
def embeddings(model: MCN) -> dict[str, torch.Tensor]:
    return model.embed(*inputs(seed=3))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_our_checkpoint_round_trip(tmp_path: Path) -> None:
    model = trained_small()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    path = tmp_path / "ckpt" / "last.pt"
    save_model_checkpoint(path, nn.DataParallel(model), extra={"step": 7, "optimizer": opt.state_dict()})
    raw = load_checkpoint(path)
    assert raw["step"] == 7 and raw["mcn_config"] == asdict(SMALL)
    assert not any(k.startswith("module.") for k in raw["model"])
    loaded = load_mcn(path)
    assert loaded.config == SMALL and not loaded.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.parameters())
    assert_same(embeddings(model), embeddings(loaded))
    assert [p.name for p in tmp_path.joinpath("ckpt").iterdir()] == ["last.pt"]  # no temp left


@pytest.mark.parametrize("prefix", ["", "module."])
def test_reference_flat_state_dict(tmp_path: Path, prefix: str) -> None:
    model = trained_small()
    path = tmp_path / "e3.pth"
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
    loaded = load_mcn(path)  # config inferred from the shapes
    assert loaded.config == SMALL
    assert_same(embeddings(model), embeddings(loaded))
    loaded.load_state_dict(model.state_dict(), strict=True)  # the plain strict load agrees too


def test_reference_file_without_batchnorm_counters(tmp_path: Path) -> None:
    model = trained_small()
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    assert_same(embeddings(model), embeddings(load_mcn(path)))


def test_our_format_with_module_prefix_and_explicit_config(tmp_path: Path) -> None:
    model = trained_small()
    path = tmp_path / "x.pt"
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}, "mcn_config": asdict(SMALL)}, path)
    assert_same(embeddings(model), embeddings(load_mcn(path, config=SMALL)))


def test_mismatch_is_a_readable_value_error(tmp_path: Path) -> None:
    sd = trained_small().state_dict()
    bad = {k: v for k, v in sd.items() if not k.startswith("DAVEnet.layer4")}  # 25 keys missing (+5 counters)
    bad["extra.weight"] = torch.zeros(1)
    bad["GU_video.fc.weight"] = torch.zeros(64, 25)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError) as err:
        load_mcn(path, config=SMALL)
    msg = str(err.value)
    # BatchNorm step counters are filled in (files from old PyTorch lack them); the rest is reported.
    n_missing = sum(1 for k in sd if k.startswith("DAVEnet.layer4") and not k.endswith("num_batches_tracked"))
    assert n_missing == 25
    assert f"{n_missing} missing keys" in msg and f"({n_missing - 10} more)" in msg
    assert "1 unexpected keys: extra.weight" in msg
    assert "GU_video.fc.weight (checkpoint (64, 25), model (64, 24))" in msg
    assert len(msg) < 2000


def test_cannot_infer_config_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "partial.pth"
    torch.save({"GU_audio.fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="GU_video.fc.weight"):
        load_mcn(path)
    missing = tmp_path / "nope" / "e30.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_mcn(missing)


def test_atomic_save_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "obj.pt"
    atomic_torch_save({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):
        atomic_torch_save({"a": lambda: 0}, path)  # cannot be pickled
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["obj.pt"]


def test_video_input_norm_standardises_collapsed_features():
    """Rows that all point the same way (random-backbone features) are separated by the input norm."""
    import torch

    from model.checkpoint import config_from_state_dict
    from model.mcn import MCN, MCNConfig

    torch.manual_seed(0)
    cfg = MCNConfig(embed_dim=16, video_dim=8, text_dim=4, davenet_widths=(4, 4, 4, 4, 8), davenet_dim=8,
                    recon_dim=8, video_input_norm=True)
    model = MCN(cfg)
    assert "video_input_norm.running_mean" in model.state_dict()
    assert "video_input_norm.weight" not in model.state_dict()  # no affine parameters
    base = torch.ones(64, 8)
    x = base + 0.01 * torch.randn(64, 8)
    model.train()
    model._video(x)  # one training pass records the batch statistics
    stats = model.video_input_norm.running_mean
    assert torch.allclose(stats, 0.1 * x.mean(0), atol=1e-6)  # momentum 0.1 from zero
    assert config_from_state_dict(model.state_dict()).video_input_norm is True
    assert "video_input_norm.running_mean" not in MCN(MCNConfig(embed_dim=16, video_dim=8, text_dim=4,
        davenet_widths=(4, 4, 4, 4, 8), davenet_dim=8, recon_dim=8)).state_dict()
