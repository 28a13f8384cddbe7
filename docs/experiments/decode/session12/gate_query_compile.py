"""Compile the decode gate's Triton kernels offline for Hopper (sm_90a, no GPU needed) and print what ptxas
reports (registers, spills) and the shared memory: the gate query (``ops/_triton/gate_query.py``) at Llama-3.1-8B's
layer shape (G 4, D 128, Dg 128) and the key-cache append (``ops/_triton/kcache_append.py``, whose epilogue the
query now shares), with the launchers' constexprs, bf16 model rows and fp32 / bf16 / fp16 gates. Pointers and
strides are declared 16-divisible (as the launches' are), the head count and capacity free.

    PYTHONPATH=src python docs/experiments/decode/session12/gate_query_compile.py
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from seerattn.ops._triton.gate_query import _query_kernel
from seerattn.ops._triton.kcache_append import _append_kernel


def compile_sm90(fn, consts: dict, pointers: dict, floats: tuple, free_ints: tuple, warps: int = 4) -> str:
    """``fn`` with ``consts`` (constexprs) and ``pointers`` (name -> element type) -> ptxas's report."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in floats:
            sig[name] = "fp32"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name not in free_ints:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
        target=GPUTarget("cuda", 90, 64),
        options={"num_warps": warps},
    )
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True,
            check=True,
        )  # fmt: skip
    report = " ".join(
        line.split(":", 1)[-1].strip() for line in out.stderr.splitlines() if "registers" in line or "spill" in line
    )
    return f"{report}; shared {kernel.metadata.shared} B"


def main() -> None:
    for gate in ("fp32", "bf16", "fp16"):
        for rope in (True, False):
            consts = dict(G=4, D=128, BLOCK_C=32, HALF=64, HALF_P=64, ROPE=rope)
            pointers = dict(Q="bf16", W=gate, NormW=gate, Cos="fp32", Sin="fp32", Out=gate)
            report = compile_sm90(_query_kernel, consts, pointers, ("eps",), ("H",))
            print(f"gate query, {gate} gate, rope={rope}:", report)
    for gate in ("fp32", "bf16"):
        consts = dict(D=128, D_P=128, BLOCK_C=32, HALF=64, HALF_P=64, BLOCK_SIZE=64, NPOOL=3, P0=1, P1=2, P2=0,
                      ROPE=True)  # fmt: skip
        pointers = dict(K="bf16", Pools="fp32", Keys=gate, W=gate, NormW=gate, Cos="fp32", Sin="fp32", Lens="i64",
                        NBlk="i64")  # fmt: skip
        report = compile_sm90(_append_kernel, consts, pointers, ("eps",), ("H", "CAP"))
        print(f"key-cache append, {gate} gate, rope=True:", report)


if __name__ == "__main__":
    main()
