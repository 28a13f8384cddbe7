"""Session 27: session 26's select_ab.py with the density kernel compiled under a register cap (Triton's ``maxnreg``
launch option), to see whether the digit counts lose their gain to occupancy (95 registers against 80).

    PYTHONPATH=src:. python3 docs/experiments/prefill-gate-policy/session27/select_maxnreg.py 80 --tag cap80
"""

from __future__ import annotations

import importlib.util
import os
import sys

from seerattn.ops._triton import select

CAP = int(sys.argv.pop(1))


class _Capped:
    """``select._density_kernel`` launched with ``maxnreg=CAP``."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, maxnreg=CAP, **kwargs)


if hasattr(select, "DENSITY_MAXNREG"):  # a tree that launches under a cap already (main from d650bee): change it
    select.DENSITY_MAXNREG = CAP
else:  # call 8's tree: the launch takes the cap from here
    select._density_kernel = _Capped(select._density_kernel)
path = os.path.join(os.path.dirname(__file__), "..", "session26", "select_ab.py")
spec = importlib.util.spec_from_file_location("select_ab", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.main()
