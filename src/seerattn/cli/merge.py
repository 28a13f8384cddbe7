"""``seerattn merge``: one adapter from a prefill-gate adapter and a decode-gate adapter."""

from __future__ import annotations


def _run(args) -> int:
    from ..hf import merge_adapters

    out = merge_adapters(args.output, prefill=args.prefill, decode=args.decode)
    print(f"wrote adapter {out} (prefill gates of {args.prefill}, decode gates of {args.decode})")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="one adapter with the prefill gates of one adapter and the decode gates of another",
        description="Write one adapter (seer_config.json with both sections, seer_gates.safetensors with both gate "
        "sets) from an adapter with prefill gates and one with decode gates of the same base model, e.g. "
        "`seerattn merge --prefill testbed/gates --decode testbed/gates-decode -o runs/testbed-both`.",
    )
    p.add_argument("--prefill", required=True, help="adapter folder whose prefill gates (and section) are taken")
    p.add_argument("--decode", required=True, help="adapter folder whose decode gates (and section) are taken")
    p.add_argument("--output", "-o", required=True, help="adapter folder to write (not one of the inputs)")
    p.set_defaults(func=_run)
