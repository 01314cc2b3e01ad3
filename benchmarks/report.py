"""Print the ratio of every benchmark group in a pytest-benchmark JSON file: reference median / fastdarts median
(the reference: the pure-PyTorch backend, or the plain oracle of an original code base in bench_compat).

python benchmarks/report.py benchmarks/results/<name>.json
"""

import json
import sys
from pathlib import Path


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    cpu = data["machine_info"].get("cpu", {})
    commit = data.get("commit_info", {})
    revision = commit.get("id", "?")[:10] + (" (dirty)" if commit.get("dirty") else "")
    print(f"{cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores; commit {revision}")
    groups: dict[str, dict[str, float]] = {}
    for bench in data["benchmarks"]:
        params = bench["params"]
        baseline = {"reference", "original"} & {params.get("impl"), params.get("backend_name")}
        side = "reference" if baseline else "fastdarts"
        groups.setdefault(bench["group"], {})[side] = bench["stats"]["median"]
    for group, sides in groups.items():
        if len(sides) == 2:
            fast, ref = sides["fastdarts"], sides["reference"]
            print(f"{group}: {fast * 1e3:.2f} ms vs {ref * 1e3:.2f} ms reference -> {ref / fast:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1])
