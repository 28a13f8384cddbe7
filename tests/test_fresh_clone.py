"""The README's main command on a fresh machine: only the repository's tracked files, nothing beside them.

The tracked files (``git ls-files``) are copied to a temporary folder that has no ``../shared`` (or
anything else) next to it, and ``seerattn quickstart --fast`` runs there as a subprocess: the copy's
``src`` first on ``PYTHONPATH`` (the packages come from the current environment, as after the README's
install command), the hub switched off. The printed numbers are checked, not only the exit code.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    deleted = subprocess.run(["git", "ls-files", "-z", "--deleted"], cwd=ROOT, capture_output=True, check=True).stdout
    gone = set(deleted.decode().split("\0"))
    return [f for f in listed.decode().split("\0") if f and f not in gone]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A copy of the tracked files in ``<tmp>/fresh/seerattn`` (``<tmp>/fresh`` holds nothing else)."""
    dest = tmp_path_factory.mktemp("fresh") / "seerattn"
    for rel in _tracked_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["seerattn"]  # no ../shared beside the copy
    return dest


def test_quickstart_fast_runs_from_the_tracked_files_alone(clone):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SEERATTN_DEBUG")}
    env.update(PYTHONPATH=str(clone / "src"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # `seerattn quickstart --fast`, with a check that the copy's package (not the installed one) runs
    code = (
        "import sys, seerattn; print('package', seerattn.__file__); "
        "from seerattn.cli import main; sys.exit(main(['quickstart', '--fast']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr[-4000:]}"
    assert f"package {clone / 'src' / 'seerattn' / '__init__.py'}" in out
    # the plan comes before any work, with its estimate
    plan = re.search(
        r"1 window\(s\) and 3 passkey prompts of 512 tokens.* on cpu: about (\d+) s on 2 free CPU cores", out
    )
    assert plan and out.index(plan.group(0)) < out.index("perplexity") and 3 <= int(plan.group(1)) <= 60
    ppl = re.search(r"perplexity\s+([\d.]+)\s+([\d.]+)", out)
    passkey = re.search(r"passkey accuracy\s+([\d.]+)\s+([\d.]+)", out)
    density = re.search(r"block density \(realised\)\s+([\d.]+)\s+([\d.]+)", out)
    recall = re.search(r"attention-mass recall of the kept blocks: ([\d.]+)", out)
    assert ppl and passkey and density and recall, out
    dense_ppl, sparse_ppl = float(ppl.group(1)), float(ppl.group(2))
    assert 20.0 < dense_ppl < 60.0 and dense_ppl < sparse_ppl < 3 * dense_ppl  # measured: 36.07 / 47.70
    assert float(passkey.group(1)) == 1.0  # dense finds the key at every depth
    # 20 % asked; 8 blocks of 64 per row keep at least sink + diagonal: measured 0.417
    assert float(density.group(1)) == 1.0 and 0.3 < float(density.group(2)) < 0.55
    assert 0.3 < float(recall.group(1)) <= 1.0
    assert len(re.findall(r"L\d:0\.\d\d", out)) == 6  # the testbed's 6 layers
    png = clone / "quickstart-out" / "gate_vs_truth.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
