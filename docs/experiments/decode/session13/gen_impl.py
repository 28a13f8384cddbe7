"""benchmarks.generate with every DecodeGate's query path forced (argv[1]: eager | triton); wip/gate-query-fused."""

import sys

from seerattn.gate import decode_gate

impl = sys.argv.pop(1)
decode_gate.DecodeGate.decode_query_impl = lambda self, device, dtype, requires_grad=False: impl
from benchmarks.generate import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
