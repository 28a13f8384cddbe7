"""The library's Triton launches (the prefill gate, the selection, sparse decode's gate and selection, the attention
kernels at their default configs) compile for Hopper (sm_90) at the GPU's tiles, on the CPU: the interpreter tests
run the kernels' Python at the interpreter's tiles and never compile them, so a kernel that only the GPU's compiler
rejects (session 17's grouped selection reassigned a constexpr in a ``static_range``) or a GPU tile over Hopper's
shared memory would pass them (:mod:`benchmarks.sm90`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from seerattn.ops._triton import gate_fwd, select
from seerattn.record import read_record

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gate_and_selection_launches_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter's kernels do not compile
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    out = tmp_path / "sm90.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.sm90", "--json", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    reports = read_record(out)["results"]
    assert all(r["fits"] for r in reports)
    density = [r for r in reports if r["kernel"] == "_density_kernel"]
    # NQ 512: the four width classes in one one-warp launch; NQ 2048: 4, 2 and 1 warps (the last with four classes)
    assert [(r["constexprs"]["W0"], r["constexprs"]["CLASSES"], r["warps"]) for r in density[:4]] == [
        (512, 4, 1), (2048, 1, 4), (1024, 1, 2), (512, 4, 1)
    ]  # fmt: skip
    # under its register cap (more resident programs for a search bound by the integer pipe), without spilling
    assert all(r["maxnreg"] == select.DENSITY_MAXNREG and " 0 bytes spill stores" in r["ptxas"] for r in density)
    assert all(int(re.search(r"Used (\d+) registers", r["ptxas"])[1]) <= select.DENSITY_MAXNREG for r in density)
    proj = [r for r in reports if r["kernel"] == "_project_kernel" and r["constexprs"]["PRECISION"] == "tf32x3"]
    # at tf32x3 the projection takes split operands on its own tile, under its register cap (three programs an SM),
    # which compiles without spilling
    rows, _, warps, stages = gate_fwd.PROJ_SPLIT_TILE
    assert proj and all((r["constexprs"]["BLOCK_M"], r["warps"], r["stages"]) == (rows, warps, stages) for r in proj)
    assert all(r["constexprs"]["SPLIT"] and " 0 bytes spill stores" in r["ptxas"] for r in proj)
    assert all(r["maxnreg"] == gate_fwd.PROJ_SPLIT_MAXNREG for r in proj)
    assert all(int(re.search(r"Used (\d+) registers", r["ptxas"])[1]) <= gate_fwd.PROJ_SPLIT_MAXNREG for r in proj)
    kernels = {r["kernel"] for r in reports}
    assert {"_pool_kernel", "_split_weights_kernel", "_project_kernel", "_rope_kernel", "_gate_scores_kernel",
            "_select_kernel", "_head_hist_kernel", "_head_digit_kernel", "_head_ties_kernel", "_append_kernel",
            "_count_kernel",
            "_decode_budget_select_kernel", "_bounds_kernel", "_bound_scores_kernel", "_top_kernel",
            "_sparse_fwd_kernel", "_union_lists_kernel", "_bwd_preprocess_kernel", "_dkdv_kernel", "_dq_kernel",
            "_attn_block_scores_kernel", "_decode_split_kernel", "_decode_merge_kernel",
            "_sparse_fwd_ws_kernel", "_sparse_fwd_ws_heads_kernel",
            "_sparse_fwd_ws_union_kernel"} <= kernels  # fmt: skip
    # the Gluon forward (warp-specialised: a loader warp and two math warpgroups), per head then per group, D 128 bf16
    # (also varlen) and D 64 fp16, per group also with 128-key steps at 64- and 128-token blocks (a 128-key ring fits:
    # 224 KiB); per query head the union kernel (two query blocks of a head a tile, also varlen; 64- and 128-key
    # steps) beside the head-pair one, and at 128-token blocks the per-group kernel with one head a tile (G 1)
    ws = [(r["kernel"], r["constexprs"]["HEAD_DIM"], r["constexprs"].get("MB"), r["constexprs"].get("BLOCK_N"),
           r["constexprs"].get("G"), r["constexprs"]["VARLEN"])
          for r in reports if r["kernel"].startswith("_sparse_fwd_ws")]  # fmt: skip
    heads, group, union = "_sparse_fwd_ws_heads_kernel", "_sparse_fwd_ws_kernel", "_sparse_fwd_ws_union_kernel"
    assert ws == [(heads, 128, None, None, None, False), (heads, 128, None, None, None, True),
                  (heads, 64, None, None, None, False), (union, 128, None, 64, None, False),
                  (union, 128, None, 64, None, True), (union, 128, None, 128, None, False),
                  (group, 128, 64, 64, 4, False), (group, 128, 64, 64, 4, True),
                  (group, 64, 64, 64, 4, False), (group, 128, 64, 128, 4, False), (group, 128, 128, 128, 1, False),
                  (group, 128, 128, 128, 4, False)]  # fmt: skip
    # the forward at every mask block and mask-head kind, and the varlen forward
    fwd = {(r["constexprs"]["MB"], r["constexprs"]["PACK"], r["constexprs"]["VARLEN"])
           for r in reports if r["kernel"] == "_sparse_fwd_kernel"}  # fmt: skip
    assert {mb for mb, _, _ in fwd} == {32, 64, 128} and any(varlen for _, _, varlen in fwd)


def test_compiling_under_the_interpreter_is_refused():
    from benchmarks import sm90
    from seerattn.ops._triton.config import interpreting

    if not interpreting():
        pytest.skip("this machine runs Triton kernels on a GPU (the refusal is for TRITON_INTERPRET=1)")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET unset"):
        sm90.compile_all()
