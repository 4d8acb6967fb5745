"""CUDA checks run by the GPU suite (``make bench-gpu``; ``pytest -m gpu tests/gpu``): each compares the
CUDA result with the CPU float32 one on the same seeded inputs. Skipped without CUDA; the default test
run deselects the ``gpu`` marker anyway.

``MCN_GPU_TESTS_DEVICE=cpu`` runs the same comparisons with the CPU as the "device" (bf16 autocast where
the CPU has it, gloo for DDP): a dry run of this file on a machine without a GPU.

Tolerances (stated here, asserted below):

* extractors, random-init weights (seed 0), CPU fp32 as the reference (see the test's docstring for
  the measured values): fp32 on the device (TF32 off): row cosines >= 0.99999, centred >= 0.99;
  bf16 autocast on the device: row cosines >= 0.9999, and for 3D centred >= 0.95.
* one training step at the tests' tiny dims, fp32 on the device vs CPU fp32: loss parts within 1e-4
  relative; bf16 on the device: within 5 % relative (the CPU bf16 test's bound).
* a 2-process DDP step (spawned with ``torch.multiprocessing``): NCCL with one GPU per rank when the
  machine has two, else both ranks on the one GPU with gloo (NCCL refuses two ranks on one device);
  gloo on the CPU dry run. Losses and DDP-averaged gradients equal the single-process step on the
  global batch (rel 1e-4; TF32 off).
* k-means (fp32, same seed and points): centroids within 1e-4 (abs) of the CPU fit, assignments equal
  on >= 99.9 % of points.
* retrieval metrics on a CUDA similarity matrix: exactly the CPU numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import free_port

DEVICE = os.environ.get("MCN_GPU_TESTS_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                       reason="needs CUDA (MCN_GPU_TESTS_DEVICE=cpu runs a CPU dry run)"),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 comparisons mean fp32: TF32 matmuls/convolutions (10-bit mantissa) are turned off."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _bf16_available() -> bool:
    if DEVICE.startswith("cuda"):
        return True
    from extractors.precision import cpu_has_bf16

    return cpu_has_bf16()


def _row_cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).numpy()


# ------------------------------------------------------------------------------------------ extractors


def _extractor(name: str, device: str, amp: str):
    from extractors import create

    config = {"allow_random_weights": True, "seed": 0, "device": device, "amp": amp, "batch_size": 4}
    return create(name, config)


def _images(n: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    """uint8 (n, h, w, 3): gradients, checkerboards, flat colours and noise (distinct contents)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            img = torch.stack([xx * 255 // w, yy * 255 // h, torch.full_like(xx, 40 * i % 256)], -1)
        elif kind == 1:
            img = (((xx // (8 + 4 * i)) + (yy // (8 + 4 * i))) % 2 * 255)[..., None].expand(h, w, 3)
        elif kind == 2:
            img = torch.tensor([(60 * i) % 256, 255 - (30 * i) % 256, 128])[None, None].expand(h, w, 3)
        else:
            img = torch.randint(0, 256, (h, w, 3), generator=g)
        out.append(img.to(torch.uint8))
    return torch.stack(out)


def _centred_cosines(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """Row cosines after removing the reference rows' mean: random-init features share one dominant
    direction (raw cosines between DIFFERENT inputs are ~0.99999), the input-dependent rest is what a
    wrong kernel, layout or preprocessing would change."""
    m = ref.double().mean(0, keepdim=True)
    return _row_cosines(a.double() - m, b.double() - m)


@pytest.mark.parametrize("name", ["resnet152_2d", "resnext101_3d"])
def test_extractor_on_device_matches_cpu_fp32(name: str) -> None:
    """Random-init weights (seed 0); 8 frames 224×298 (2D) or 4 windows 16×112×112 (3D) of distinct
    contents. fp32 on the device: raw row cosines >= 0.99999 and centred ones >= 0.99 (inputs differ
    from each other by centred cosines <= 0.96: a mix-up fails). bf16 autocast on the device: raw
    cosines >= 0.9999 (CPU bf16 measured 0.99999 for both); centred >= 0.95 for 3D (CPU bf16: 0.992).
    Random-init ResNet-152 is nearly input-independent, so its centred bf16 cosine is noise (CPU bf16:
    0.53) and is not asserted: bf16 fidelity with real weights is benchmarks/precision.py's."""
    if name == "resnet152_2d":
        x = _images(8, 224, 298)
    else:
        x = torch.stack([_images(16, 112, 112, seed=s).roll(s, dims=2) for s in range(4)])
    ref = _extractor(name, "cpu", "fp32")(x)
    assert ref.shape == (x.shape[0], 2048) and torch.isfinite(ref).all()
    centred_ref = torch.nn.functional.normalize(ref.double() - ref.double().mean(0, keepdim=True), dim=1)
    between = (centred_ref @ centred_ref.T).fill_diagonal_(-1).max().item()
    assert between <= 0.96, between  # the centred check below can fail
    fp32 = _extractor(name, DEVICE, "fp32")(x)
    assert _row_cosines(fp32, ref).min() >= 0.99999
    assert _centred_cosines(fp32, ref, ref).min() >= 0.99
    if _bf16_available():
        bf16_extractor = _extractor(name, DEVICE, "bf16")
        assert bf16_extractor.precision == "bf16"
        bf16 = bf16_extractor(x)
        assert _row_cosines(bf16, ref).min() >= 0.9999
        if name == "resnext101_3d":
            assert _centred_cosines(bf16, ref, ref).min() >= 0.95


def test_torchcodec_nvdec_picks_the_same_frames_as_pyav(tmp_path: Path) -> None:
    """``torchcodec-cuda`` (NVDEC) on a pre-made or generated H.264 video: same targets, pictures within
    the scaler/colour-conversion tolerance of the CPU backends' agreement test."""
    if not DEVICE.startswith("cuda"):
        pytest.skip("NVDEC needs CUDA")
    try:
        import torchcodec.decoders
    except Exception as exc:  # noqa: BLE001 - no torchcodec matching this torch, or no FFmpeg libraries
        pytest.skip(f"torchcodec unavailable: {str(exc).splitlines()[0][:200]}")
    from extractors.decode import DecodeConfig, iter_visual

    video = Path(__file__).resolve().parents[2] / ".bench" / "bench_720p_60s.mp4"
    if not video.exists():
        import shutil
        import subprocess

        if shutil.which("ffmpeg") is None:
            pytest.skip("no pre-made video (tools/gpu_bundle.sh) and no ffmpeg")
        video = tmp_path / "v.mp4"
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                        "testsrc2=size=1280x720:rate=30:duration=4", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                        str(video)], check=True)

    try:  # PyPI's torchcodec wheels are CPU-only builds: NVDEC needs the CUDA one
        torchcodec.decoders.VideoDecoder(str(video), device=DEVICE).get_frame_at(0)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"torchcodec cannot decode on {DEVICE}: {str(exc).splitlines()[0][:200]}")

    def first(backend: str) -> tuple[np.ndarray, np.ndarray]:
        cfg = DecodeConfig(backend=backend, chunk_seconds=2.0, fallback_pyav=False)  # no silent PyAV
        chunk = next(iter(iter_visual(video, cfg)))
        return chunk.frames_2d, chunk.frames_3d

    a2, a3 = first("pyav")
    b2, b3 = first("torchcodec-cuda")
    assert a2.shape == b2.shape and a3.shape == b3.shape
    for a, b in ((a2, b2), (a3, b3)):
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=(1, 2, 3))
        assert diff.max() < 6.0, diff
    same = np.abs(a3[1:-1].astype(np.int16) - b3[1:-1].astype(np.int16)).mean(axis=(1, 2, 3))
    assert (same < np.abs(a3[1:-1].astype(np.int16) - b3[:-2].astype(np.int16)).mean(axis=(1, 2, 3))).all()


# ------------------------------------------------------------------------------------------ training


def _train_helpers():
    from tests.model import test_train as tt

    return tt


@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_one_training_step_on_device_matches_cpu(amp: str) -> None:
    from model.train import LOSS_PARTS, Trainer

    if amp == "bf16" and not _bf16_available():
        pytest.skip("no bf16 on this device")
    tt = _train_helpers()
    batch = tt._synthetic_global_batch(0)
    cpu = Trainer(tt.tiny_config(warmup_steps=0), total_steps=10, device=torch.device("cpu"))
    dev = Trainer(tt.tiny_config(warmup_steps=0, amp=amp, device=DEVICE), total_steps=10,
                  device=torch.device(DEVICE))
    assert dev.precision == amp
    a, b = cpu.train_step(batch), dev.train_step(batch)
    rel = 1e-4 if amp == "fp32" else 0.05
    for k in LOSS_PARTS:
        assert b[k] == pytest.approx(a[k], rel=rel, abs=1e-3 if amp == "bf16" else 1e-6), k
    if DEVICE.startswith("cuda"):
        assert next(dev.model.parameters()).is_cuda


def _ddp_backend(device: str) -> str:
    """NCCL with one GPU per rank when there are two; on one GPU gloo (NCCL refuses two ranks on the same
    device: "Duplicate GPU detected"; gloo runs all_gather / all_reduce on CUDA tensors)."""
    return "nccl" if device.startswith("cuda") and torch.cuda.device_count() >= 2 else "gloo"


def _ddp_worker(rank: int, world: int, port: int, out: str, device: str) -> None:
    import torch.distributed as dist

    from model.train import Trainer

    tt = _train_helpers()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    backend = _ddp_backend(device)
    if device.startswith("cuda"):
        device = f"cuda:{rank}" if backend == "nccl" else "cuda:0"
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        # plain BatchNorm: the batch is built so that per-rank statistics equal the global ones (and
        # SyncBatchNorm's all_gather_into_tensor is not a gloo collective)
        trainer = Trainer(tt.tiny_config(warmup_steps=0, device=device, sync_bn=False), total_steps=10,
                          device=torch.device(device))
        l1 = trainer.train_step(tt._rank_slice(tt._synthetic_global_batch(0), rank, world))
        g1 = {k: v.cpu() for k, v in tt._grads(trainer).items()}
        if rank == 0:
            torch.save({"l1": l1, "g1": g1, "backend": backend}, out)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_single_process(tmp_path: Path) -> None:
    """Two ranks spawned with torch.multiprocessing, each with half the global batch, on the device."""
    import torch.multiprocessing as mp

    from model.train import LOSS_PARTS, Trainer

    tt = _train_helpers()
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, free_port(), str(out), DEVICE), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    assert ddp["backend"] == _ddp_backend(DEVICE)
    single = Trainer(tt.tiny_config(warmup_steps=0, device=DEVICE), total_steps=10,
                     device=torch.device(DEVICE))
    l1 = single.train_step(tt._synthetic_global_batch(0))
    g1 = {k: v.cpu() for k, v in tt._grads(single).items()}
    for k in (*LOSS_PARTS, "lr"):
        assert ddp["l1"][k] == pytest.approx(l1[k], rel=1e-4, abs=1e-5), k
    assert set(ddp["g1"]) == set(g1)
    for name, g in g1.items():  # DDP-averaged gradients equal the global-batch gradients
        err = (ddp["g1"][name] - g).abs().max().item()
        assert err <= 1e-4 * g.abs().max().item() + 1e-6, (name, err)


# ------------------------------------------------------------------------------------------ k-means


def test_kmeans_on_device_matches_cpu() -> None:
    from model.kmeans import KMeansConfig, OnlineKMeans

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(16, 64, generator=g) * 3
    x = centres[torch.randint(16, (4096,), generator=g)] + torch.randn(4096, 64, generator=g)
    cfg = KMeansConfig(k=16, queue_batches=1, refit_every=1, iters=10, tol=-1.0, seed=0)
    fits = {}
    for device in ("cpu", DEVICE):
        km = OnlineKMeans(cfg, dim=64, device=device)
        labels = km.step(x.to(device))
        fits[device] = (km.centroids.cpu(), labels.cpu())
    (c_cpu, l_cpu), (c_dev, l_dev) = fits["cpu"], fits[DEVICE]
    assert c_cpu.shape == (16, 64)
    torch.testing.assert_close(c_dev, c_cpu, rtol=0, atol=1e-4)
    assert (l_dev == l_cpu).float().mean().item() >= 0.999


# ------------------------------------------------------------------------------------------ retrieval


def test_retrieval_metrics_on_device_equal_cpu() -> None:
    from evaluation.retrieval import retrieval_metrics

    rng = np.random.default_rng(3)
    text, video = rng.normal(size=(500, 32)).astype(np.float32), rng.normal(size=(500, 32)).astype(np.float32)
    video[:100] = text[:100] + 0.3 * video[:100]  # some true pairs rank high
    sim = text @ video.T
    cpu = retrieval_metrics(sim)
    dev = retrieval_metrics(torch.from_numpy(sim).to(DEVICE), chunk_size=128)
    assert dev == cpu
    assert 0.15 < cpu["R@1"] < 1.0  # not trivial
