"""``seerattn convert``: the official ``attn_gate_weights.pth`` -> a seerattn adapter folder."""

from __future__ import annotations


def _run(args) -> int:
    from transformers import AutoConfig

    from ..hf import convert_official_checkpoint

    config = AutoConfig.from_pretrained(args.base_model)
    out = convert_official_checkpoint(
        args.checkpoint, args.output, config, official_config=args.official_config, base_model=args.base_model
    )
    print(f"wrote adapter {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert an official SeerAttention gate checkpoint to an adapter")
    p.add_argument("checkpoint", help="path to attn_gate_weights.pth")
    p.add_argument("--base-model", required=True, help="local path of the base model (its config.json is read)")
    p.add_argument(
        "--official-config",
        help="the official gates' config.json, which names the gate type (default: the one next to the checkpoint)",
    )
    p.add_argument("--output", "-o", required=True, help="adapter folder to write")
    p.set_defaults(func=_run)
