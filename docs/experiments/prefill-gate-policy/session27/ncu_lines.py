"""Session 27: a summary of an Nsight Compute source page (``ncu --page source --print-source sass --csv``, call4.sh):
the executed instructions by opcode, the stall samples by reason, the most-sampled instructions and, given the same
kernel's SASS compiled offline with line info (``nvdisasm -c -g`` of the cubin ptxas builds from Triton's PTX, the
compile ``benchmarks.sm90`` does), the executed instructions and samples by source line.

    python3 ncu_lines.py call4/source_density_kernel.csv [density.sass]

The offline SASS must come from the tree the device ran (call 4: 43dd651); its addresses are matched to the CSV's
(offsets from the kernel's first instruction) and every opcode is checked. The CSVs (0.7-1.3 MB each) are not kept;
their summaries are (call4/source_summary.txt).
"""

from __future__ import annotations

import collections
import csv
import re
import sys


def opcode(text: str) -> str:
    text = re.sub(r"^@!?U?P\w+\s+", "", text.strip())
    return text.split()[0] if text else ""


def main() -> None:
    rows = list(csv.reader(open(sys.argv[1])))
    k = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    hdr = rows[k]
    data = [r for r in rows[k + 1 :] if len(r) == len(hdr)]
    col = {name: hdr.index(name) for name in ("Address", "Source", "Instructions Executed")}
    col["samples"] = hdr.index("Warp Stall Sampling (All Samples)")
    reasons = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    executed = [float(r[col["Instructions Executed"]] or 0) for r in data]
    samples = [float(r[col["samples"]] or 0) for r in data]
    total_e, total_s = sum(executed), sum(samples)
    print(f"{sys.argv[1]}: {len(data)} instructions, {total_e:.0f} executed (warp-level), {total_s:.0f} samples")
    ops = collections.Counter()
    for r, e in zip(data, executed, strict=True):
        ops[opcode(r[col["Source"]])] += e
    print("executed by opcode (%):", [(o, round(v / total_e * 100, 1)) for o, v in ops.most_common(12)])
    stall = collections.Counter()
    for r in data:
        for h in reasons:
            stall[h[6:]] += float(r[hdr.index(h)] or 0)
    print("samples by reason (%):", [(h, round(v / total_s * 100, 1)) for h, v in stall.most_common(8)])
    print("most-sampled instructions (index, % of samples, instruction):")
    for i in sorted(sorted(range(len(data)), key=lambda i: -samples[i])[:12]):
        print(f"  {i:5d} {samples[i] / total_s * 100:5.1f}%  {data[i][col['Source']].strip()[:70]}")
    if len(sys.argv) < 3:
        return
    offline, line = {}, None
    for text in open(sys.argv[2]):
        m = re.search(r"## File .*line (\d+)", text)
        if m:
            line = int(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", text)
        if m:
            offline[int(m.group(1), 16)] = (line, m.group(2))
    base = int(data[0][col["Address"]], 16)
    addr = [int(r[col["Address"]], 16) - base for r in data]
    same = sum(
        a in offline and opcode(offline[a][1]) == opcode(r[col["Source"]]) for a, r in zip(addr, data, strict=True)
    )
    print(f"offline SASS: {same} of {len(data)} opcodes match at the same offsets")
    by_e, by_s = collections.Counter(), collections.Counter()
    for a, e, s in zip(addr, executed, samples, strict=True):
        ln = offline.get(a, (None, ""))[0]
        by_e[ln] += e
        by_s[ln] += s
    print("by source line (line: % executed, % samples):")
    for ln, v in by_e.most_common(20):
        print(f"  {ln}: {v / total_e * 100:5.1f} {by_s[ln] / total_s * 100:5.1f}")


if __name__ == "__main__":
    main()
