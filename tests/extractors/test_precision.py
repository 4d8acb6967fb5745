"""extractors.precision: the amp setting, what it resolves to per device, and where the result is recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from extractors import get_extractor
from extractors.precision import autocast, cpu_has_bf16, normalize_amp, resolve_precision, torch_dtype
from pipeline.config import load_config
from pipeline.extract import ExtractStage
from store.layout import Workspace
from store.lineage import fingerprint, runtime_fields


def test_cpu_bf16_is_torchs_capability_query() -> None:
    caps = torch.cpu.get_capabilities()
    assert cpu_has_bf16() == bool(caps.get("avx512_bf16") or caps.get("amx_bf16") or caps.get("bf16")
                                  or caps.get("sve_bf16"))


@pytest.mark.parametrize(("amp", "mode"), [("auto", "auto"), ("bf16", "bf16"), ("fp32", "fp32"), (True, "auto"),
                                           (False, "fp32"), ("on", "auto"), ("OFF", "fp32"), ("bfloat16", "bf16")])
def test_normalize_amp_maps_old_and_new_spellings(amp, mode) -> None:
    assert normalize_amp(amp) == mode


@pytest.mark.parametrize("amp", ["half", "fp16", 1.0, None])
def test_normalize_amp_rejects_the_rest(amp) -> None:
    with pytest.raises(ValueError, match="amp"):
        normalize_amp(amp)


def test_resolve_precision_per_device() -> None:
    native = "bf16" if cpu_has_bf16() else "fp32"
    assert [resolve_precision(a, "cpu") for a in ("auto", True, "bf16", "fp32", False)] == [
        native, native, "bf16", "fp32", "fp32"]
    assert [resolve_precision(a, torch.device("cuda")) for a in ("auto", True, "bf16", "fp32")] == [
        "bf16", "bf16", "bf16", "fp32"]
    assert resolve_precision("auto", "meta") == "fp32"
    assert (torch_dtype("fp32"), torch_dtype("bf16"), torch_dtype("fp16")) == (
        torch.float32, torch.bfloat16, torch.float16)


def test_autocast_computes_in_the_resolved_dtype() -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32


@pytest.mark.parametrize("name", ["resnet152_2d", "resnext101_3d"])
def test_resolved_precision_is_described_and_fingerprinted(name: str, tmp_path: Path) -> None:
    """amp is runtime-only; the precision it resolves to is in describe() (records, sample metadata)
    and in the field's fingerprint, so bf16 and fp32 features never share one."""
    cls = get_extractor(name)
    assert "amp" in runtime_fields(cls.Config)
    desc = {a: cls.describe_config(cls.Config(allow_random_weights=True, device="cpu", amp=a))
            for a in ("fp32", "bf16", "auto")}
    assert (desc["fp32"]["precision"], desc["bf16"]["precision"]) == ("fp32", "bf16")
    assert desc["auto"]["precision"] == ("bf16" if cpu_has_bf16() else "fp32")
    field = cls.field

    def field_fingerprint(amp: str) -> str:
        cfg = load_config(None, ["extract.allow_random_weights=true", f"extract.{field}.options.amp={amp}",
                                 f"extract.{field}.options.device=cpu"])
        return fingerprint(ExtractStage(Workspace(tmp_path), cfg.extract, tmp_path).field_config(field))

    assert field_fingerprint("fp32") != field_fingerprint("bf16")
    assert field_fingerprint("auto") == field_fingerprint("bf16" if cpu_has_bf16() else "fp32")
