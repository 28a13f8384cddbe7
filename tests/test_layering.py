"""Import layering: ``import seerattn`` (and ``seerattn.gate``) pulls in neither triton nor transformers.

The checks run in one fresh interpreter (starting one costs a torch import, ~2 s) so that modules
imported by other tests cannot hide a leak; it reports what is loaded after each stage.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

HEAVY = ("triton", "transformers")
# torch is always imported by seerattn: the positive control showing that the probe sees imports.
PROBED = ("torch", *HEAVY)

_PROBE = """
import json, sys
probed = {probed!r}

def loaded():
    return {{p: any(m == p or m.startswith(p + ".") for m in sys.modules) for p in probed}}

report = {{"start": loaded()}}
import seerattn
report["import seerattn"] = loaded()
import seerattn.block_mask, seerattn.ops, seerattn.ops.reference
report["submodules"] = loaded()
if {with_gate!r}:
    import seerattn.gate
    report["import seerattn.gate"] = loaded()
import torch
q = torch.randn(1, 2, 20, 8)
m = seerattn.mask_from_scores(torch.rand(1, 2, 2, 2), seerattn.SparsityPolicy(), 20, 16)
seerattn.block_sparse_attention(q, q, q, m)
seerattn.attention_with_block_scores(q, q, q, block_size=16)
report["cpu reference ops"] = loaded()
print(json.dumps(report))
"""

HAS_GATE = importlib.util.find_spec("seerattn.gate") is not None


@pytest.fixture(scope="module")
def report() -> dict[str, dict[str, bool]]:
    code = _PROBE.format(probed=PROBED, with_gate=HAS_GATE)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"probe failed in a fresh interpreter:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _heavy(stage: dict[str, bool]) -> list[str]:
    return [h for h in HEAVY if stage[h]]


def test_probe_sees_imports(report):
    assert report["start"] == {p: False for p in PROBED}, "the fresh interpreter already had torch loaded"
    assert report["import seerattn"]["torch"], "the probe failed to see torch being imported"


def test_import_seerattn_is_light(report):
    assert _heavy(report["import seerattn"]) == []
    assert _heavy(report["submodules"]) == []


def test_cpu_reference_ops_stay_light(report):
    assert _heavy(report["cpu reference ops"]) == []


@pytest.mark.skipif(not HAS_GATE, reason="seerattn.gate not written yet")
def test_import_gate_is_light(report):
    assert _heavy(report["import seerattn.gate"]) == []
