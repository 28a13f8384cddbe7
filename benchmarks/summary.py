"""Print the tables of one or more benchmark JSON files (``python -m benchmarks.summary a.json ...``)."""

from __future__ import annotations

import json
import sys

from .attention import print_table


def main(paths: list[str]) -> int:
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            print(f"# {path}: {err}")
            continue
        print_table(data["rows"], data["env"])
        for failure in data.get("failures", []):
            print(f"# failed: {failure[:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
