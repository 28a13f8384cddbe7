"""Compile the decode gate's Triton kernels offline for Hopper (sm_90a, no GPU needed) and print what ptxas
reports (registers, spills) and the shared memory: the gate query (``ops/_triton/gate_query.py``) at Llama-3.1-8B's
layer shape (G 4, D 128, Dg 128) and the key-cache append (``ops/_triton/kcache_append.py``, whose epilogue the
query now shares), with the launchers' constexprs, bf16 model rows and fp32 / bf16 / fp16 gates. Pointers and
strides are declared 16-divisible (as the launches' are), the head count and capacity free.

    PYTHONPATH=src:. python docs/experiments/decode/session12/gate_query_compile.py
"""

from __future__ import annotations

from benchmarks.sm90 import compile_sm90
from seerattn.ops._triton.gate_query import _query_kernel
from seerattn.ops._triton.kcache_append import _append_kernel


def report(r: dict) -> str:
    return f"{r['ptxas']}; shared {r['shared']} B"


def main() -> None:
    for gate in ("fp32", "bf16", "fp16"):
        for rope in (True, False):
            consts = dict(G=4, D=128, BLOCK_C=32, HALF=64, HALF_P=64, ROPE=rope)
            pointers = dict(Q="bf16", W=gate, NormW=gate, Cos="fp32", Sin="fp32", Out=gate)
            r = compile_sm90(_query_kernel, consts, pointers, ("H",), 4, floats=("eps",))
            print(f"gate query, {gate} gate, rope={rope}:", report(r))
    for gate in ("fp32", "bf16"):
        consts = dict(D=128, D_P=128, BLOCK_C=32, HALF=64, HALF_P=64, BLOCK_SIZE=64, NPOOL=3, P0=1, P1=2, P2=0,
                      ROPE=True)  # fmt: skip
        pointers = dict(K="bf16", Pools="fp32", Keys=gate, W=gate, NormW=gate, Cos="fp32", Sin="fp32", Lens="i64",
                        NBlk="i64")  # fmt: skip
        r = compile_sm90(_append_kernel, consts, pointers, ("H", "CAP"), 4, floats=("eps",))
        print(f"key-cache append, {gate} gate, rope=True:", report(r))


if __name__ == "__main__":
    main()
