"""MCN losses against hand-computed 3×3 cases (plain Python math, not the code under test)."""

from __future__ import annotations

import math

import pytest
import torch

from model.losses import LossConfig, cluster_loss, mcn_losses, mms_loss

M = 0.1  # a margin large enough to matter in the numbers

# B = 3 clips, D = 2.
V = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
A = [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]
T = [[1.0, 1.0], [0.0, 2.0], [1.0, 0.0]]
C = [[1.0, 0.0], [0.0, 1.0]]  # K = 2 centroids
LABELS = [0, 1, 0]
RECON = {  # (prediction, target) per head, B × d
    "video": ([[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
    "audio": ([[0.5, 0.5], [2.0, 2.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]),
    "text": ([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, 3.0], [1.0, 1.0]]),
}


def ce(logits: list[float], target: int) -> float:
    """−log softmax(logits)[target]."""
    return math.log(sum(math.exp(x) for x in logits)) - logits[target]


def mms_by_hand(s: list[list[float]]) -> float:
    """Rows and columns cross-entropy to the diagonal; s already has the margin subtracted."""
    n = len(s)
    rows = sum(ce(s[i], i) for i in range(n)) / n
    cols = sum(ce([s[i][j] for i in range(n)], j) for j in range(n)) / n
    return rows + cols


def make_out() -> dict[str, torch.Tensor]:
    v, a, t = (torch.tensor(x) for x in (V, A, T))
    out = {"video": v, "audio": a, "text": t, "fused": (v + a + t) / 3}
    for head, (pred, target) in RECON.items():
        out[f"recon_{head}"] = torch.tensor(pred)
        out[f"target_{head}"] = torch.tensor(target)
    return out


def run(audio_mask: list[bool] | None = None, labels: bool = True, **cfg: object) -> dict[str, float]:
    parts = mcn_losses(
        make_out(),
        labels=torch.tensor(LABELS) if labels else None,
        centroids=torch.tensor(C) if labels else None,
        audio_mask=None if audio_mask is None else torch.tensor(audio_mask),
        cfg=LossConfig(margin=M, **cfg),
    )
    return {k: float(v) for k, v in parts.items()}


# S_tv = T·Vᵀ written out: t0=[1,1] → (1, 1, 2); t1=[0,2] → (0, 2, 2); t2=[1,0] → (1, 0, 1); minus M on the diagonal.
S_TV = [[1 - M, 1, 2], [0, 2 - M, 2], [1, 0, 1 - M]]
# S_at = A·Tᵀ: a0=[0,1] → (1, 2, 0); a1=[1,0] → (1, 0, 1); a2=[.5,.5] → (1, 1, .5).
S_AT = [[1 - M, 2, 0], [1, 0 - M, 1], [1, 1, 0.5 - M]]
# S_av = A·Vᵀ: a0 → (0, 1, 1); a1 → (1, 0, 1); a2 → (.5, .5, 1).
S_AV = [[0 - M, 1, 1], [1, 0 - M, 1], [0.5, 0.5, 1 - M]]
# Cluster logits z·Cᵀ with C = I, minus M at the label (0, 1, 0).
CL_V = [[1 - M, 0], [0, 1 - M], [1 - M, 1]]
CL_A = [[0 - M, 1], [1, 0 - M], [0.5 - M, 0.5]]
CL_T = [[1 - M, 1], [0, 2 - M], [1 - M, 0]]


def mean_ce(rows: list[list[float]], labels: list[int]) -> float:
    return sum(ce(r, y) for r, y in zip(rows, labels)) / len(rows)


def mse_clip(p: list[float], t: list[float]) -> float:
    return sum((x - y) ** 2 for x, y in zip(p, t)) / len(p)


def recon_head(head: str, keep: list[int] | None = None) -> float:
    pred, target = RECON[head]
    idx = keep if keep is not None else list(range(len(pred)))
    if not idx:
        return 0.0
    return sum(mse_clip(pred[i], target[i]) for i in idx) / len(idx)


def test_mms_matches_hand_computation() -> None:
    # t·v diagonal entries by hand: row CE e.g. row 0 = log(e^.9 + e^1 + e^2) − .9
    assert ce(S_TV[0], 0) == pytest.approx(math.log(math.exp(0.9) + math.e + math.exp(2)) - 0.9)
    got = float(mms_loss(torch.tensor(T), torch.tensor(V), margin=M))
    assert got == pytest.approx(mms_by_hand(S_TV), rel=1e-6)
    # (v, t) instead of (t, v) transposes S: rows and columns swap, the sum is the same.
    assert float(mms_loss(torch.tensor(V), torch.tensor(T), margin=M)) == pytest.approx(got, rel=1e-6)


def test_all_parts_with_audio() -> None:
    p = run()
    assert p["mms_tv"] == pytest.approx(mms_by_hand(S_TV), rel=1e-6)
    assert p["mms_at"] == pytest.approx(mms_by_hand(S_AT), rel=1e-6)
    assert p["mms_av"] == pytest.approx(mms_by_hand(S_AV), rel=1e-6)
    assert p["mms"] == pytest.approx(p["mms_tv"] + p["mms_at"] + p["mms_av"], rel=1e-6)
    cl = (mean_ce(CL_V, LABELS) + mean_ce(CL_A, LABELS) + mean_ce(CL_T, LABELS)) / 3
    assert p["cluster"] == pytest.approx(cl, rel=1e-6)
    # recon: video (2 + .5 + 2)/3 = 1.5; audio (.25 + 4 + .5)/3; text (.5 + 2 + 0)/3
    rec = 1.5 + (0.25 + 4 + 0.5) / 3 + (0.5 + 2 + 0) / 3
    assert recon_head("video") == pytest.approx(1.5)
    assert p["recon"] == pytest.approx(rec, rel=1e-6)
    assert p["total"] == pytest.approx(p["mms"] + 1.0 * cl + 50.0 * rec, rel=1e-6)


def test_weights_in_total() -> None:
    p = run(cluster_weight=0.5, recon_weight=2.0)
    assert p["total"] == pytest.approx(p["mms"] + 0.5 * p["cluster"] + 2.0 * p["recon"], rel=1e-6)


def test_audio_mask_drops_clips_from_audio_terms() -> None:
    p = run(audio_mask=[True, False, True])
    assert p["mms_tv"] == pytest.approx(mms_by_hand(S_TV), rel=1e-6)  # untouched
    # rows/columns 0 and 2 of the audio matrices, margin on the new diagonal
    s_at = [[1 - M, 0], [1, 0.5 - M]]
    s_av = [[0 - M, 1], [0.5, 1 - M]]
    assert p["mms_at"] == pytest.approx(mms_by_hand(s_at), rel=1e-6)
    assert p["mms_av"] == pytest.approx(mms_by_hand(s_av), rel=1e-6)
    l_a = mean_ce([CL_A[0], CL_A[2]], [LABELS[0], LABELS[2]])
    cl = (mean_ce(CL_V, LABELS) + l_a + mean_ce(CL_T, LABELS)) / 3
    assert p["cluster"] == pytest.approx(cl, rel=1e-6)
    rec = recon_head("video") + recon_head("audio", [0, 2]) + recon_head("text")
    assert recon_head("audio", [0, 2]) == pytest.approx((0.25 + 0.5) / 2)
    assert p["recon"] == pytest.approx(rec, rel=1e-6)


def test_no_audio_at_all_gives_zero_audio_parts_without_nan() -> None:
    out = make_out()
    for k in ("video", "audio", "text"):
        out[k] = out[k].clone().requires_grad_(True)
    parts = mcn_losses(
        out,
        labels=torch.tensor(LABELS),
        centroids=torch.tensor(C),
        audio_mask=torch.tensor([False, False, False]),
        cfg=LossConfig(margin=M),
    )
    assert float(parts["mms_at"].detach()) == 0.0 and float(parts["mms_av"].detach()) == 0.0
    cl = (mean_ce(CL_V, LABELS) + 0.0 + mean_ce(CL_T, LABELS)) / 3
    assert float(parts["cluster"].detach()) == pytest.approx(cl, rel=1e-6)
    assert float(parts["recon"].detach()) == pytest.approx(recon_head("video") + recon_head("text"), rel=1e-6)
    assert all(torch.isfinite(v) for v in parts.values())
    parts["total"].backward()
    assert torch.all(out["audio"].grad == 0)
    assert torch.isfinite(out["video"].grad).all() and out["video"].grad.abs().sum() > 0


def test_use_audio_false_is_text_video_only() -> None:
    p = run(use_audio=False)
    assert p["mms_at"] == 0.0 and p["mms_av"] == 0.0
    assert p["mms"] == pytest.approx(mms_by_hand(S_TV), rel=1e-6)
    assert p["cluster"] == pytest.approx((mean_ce(CL_V, LABELS) + mean_ce(CL_T, LABELS)) / 2, rel=1e-6)
    assert p["recon"] == pytest.approx(recon_head("video") + recon_head("text"), rel=1e-6)


def test_no_labels_means_no_cluster_term() -> None:
    p = run(labels=False)
    assert p["cluster"] == 0.0
    assert p["total"] == pytest.approx(p["mms"] + 50.0 * p["recon"], rel=1e-6)


def test_fused_cluster_mode() -> None:
    p = run(cluster_mode="fused")
    f = [[(V[i][d] + A[i][d] + T[i][d]) / 3 for d in range(2)] for i in range(3)]
    rows = [[f[i][0] - (M if LABELS[i] == 0 else 0), f[i][1] - (M if LABELS[i] == 1 else 0)] for i in range(3)]
    assert f[2] == pytest.approx([2.5 / 3, 1.5 / 3])
    assert p["cluster"] == pytest.approx(mean_ce(rows, LABELS), rel=1e-6)


def test_cluster_loss_uses_raw_dot_products() -> None:
    # centroid scale matters (no normalisation inside the loss): C·10
    got = float(cluster_loss(torch.tensor(V), torch.tensor(C) * 10, torch.tensor(LABELS), margin=M))
    rows = [[10 - M, 0], [0, 10 - M], [10 - M, 10]]
    assert got == pytest.approx(mean_ce(rows, LABELS), rel=1e-6)


def test_half_precision_inputs_are_upcast() -> None:
    out = {k: v.half() for k, v in make_out().items()}
    parts = mcn_losses(out, labels=torch.tensor(LABELS), centroids=torch.tensor(C), audio_mask=None, cfg=LossConfig(margin=M))
    assert parts["total"].dtype == torch.float32
    assert float(parts["mms_tv"]) == pytest.approx(mms_by_hand(S_TV), rel=1e-3)


def test_invalid_cluster_mode() -> None:
    with pytest.raises(ValueError):
        LossConfig(cluster_mode="nope")  # type: ignore[arg-type]
