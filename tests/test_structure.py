"""The structure the design promises: arrows point down, one owner of the workspace contract, a light CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the first-party packages it may import (the layers, bottom first)
ALLOWED = {
    "store": set(),
    "extractors": {"store"},
    "synthetic": {"store"},
    "model": {"store", "extractors"},  # extractors.precision: one owner of the amp / precision rule
    "evaluation": {"store", "model", "extractors"},
    "pipeline": {"store", "model", "extractors", "evaluation", "synthetic"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_arrows_point_down(package):
    first_party = set(ALLOWED)
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = (_imports(path) & first_party) - ALLOWED[package] - {package}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}: only {sorted(ALLOWED[package])} allowed"


def test_only_the_store_knows_the_shard_names_and_globs_the_workspace():
    """No second formatter of shard file names and no second glob of the workspace outside store/."""
    for package in ALLOWED:
        if package == "store":
            continue
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            for needle in ('f"shard-', "shard-{", "step-{", '/ "latest"', '/ "runs"', '/ "eval"', '/ "features"',
                           '"manifest.jsonl"', '"scan.json"', '"record.json"'):
                assert needle not in text, f"{path.relative_to(ROOT)} spells {needle!r}: ask store.layout"
            for call in ('glob("shard', 'glob("*/', 'glob("step-', '.tmp-{'):
                assert call not in text, f"{path.relative_to(ROOT)} globs or names workspace files: {call!r}"


def test_help_starts_without_torch():
    code = ("import sys\nfrom pipeline.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("NO-TORCH") and "usage: mcn" in proc.stdout
