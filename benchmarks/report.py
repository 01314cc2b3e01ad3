"""Print the ratio of every benchmark group in a pytest-benchmark JSON file: reference median / fastdarts median
(the reference: the pure-PyTorch backend, or the plain oracle of an original code base in bench_compat), and
fastdarts against any other implementation in the group (a floor such as a plain copy of the same bytes).

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
        impl = params.get("impl") or "fastdarts"
        baseline = {"reference", "original"} & {impl, params.get("backend_name")}
        side = "reference" if baseline else impl  # another impl (bench_partial_channel's "copy") is a floor
        groups.setdefault(bench["group"], {})[side] = bench["stats"]["median"]
    for group, sides in groups.items():
        fast, ref = sides.get("fastdarts"), sides.get("reference")
        if fast is None or ref is None:
            continue
        line = f"{group}: {fast * 1e3:.2f} ms vs {ref * 1e3:.2f} ms reference -> {ref / fast:.2f}x"
        floors = [f"{fast / t:.1f}x the {name} ({t * 1e3:.3f} ms)" for name, t in sides.items()
                  if name not in ("fastdarts", "reference")]  # fmt: skip
        print(line + ("; " + ", ".join(floors) if floors else ""))


def _usage(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        _usage("usage: python benchmarks/report.py <pytest-benchmark JSON file>")
    try:
        main(sys.argv[1])
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
    ) as e:  # not there, not JSON, another shape
        _usage(f"benchmarks/report.py: {sys.argv[1]!r} is not a pytest-benchmark JSON file that can be read: "
               f"{type(e).__name__}: {e}")  # fmt: skip
