"""The GPU benchmark suite (`python -m benchmarks.run`) runs end to end on tiny shapes, records what it measured
with its environment, keeps going past a failing case, and answers bad input with one line and exit code 2; so
does `benchmarks/report.py`, the ratios of a pytest-benchmark file."""

import json
import re
import subprocess
import sys

import pytest
import torch

from benchmarks import run

QUICK = ["--device", "cpu", "--quick", "--warmup", "1", "--min-time", "0.01"]


@pytest.mark.slow
def test_quick_suite_measures_every_selected_case(tmp_path, capsys):
    out = tmp_path / "suite.json"
    only = "step/cifar-b64/*,hvp/*,op/mixed_op/2x4x4x4/*,op/partial_channel/*x2x4/forward,compat/darts,agreement*"
    assert run.main([*QUICK, "--only", only, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    env = results["environment"]
    assert env["torch"] == torch.__version__ and env["device_type"] == "cpu" and env["git"]
    steps = {"fastdarts", "fastdarts-bf16", "fastdarts-channels-last", "reference"}
    expected = {
        "step/cifar-b64/first": steps | {"fastdarts-batched", "fastdarts-recompute"},
        "step/cifar-b64/second": steps
        | {"fastdarts-batched", "fastdarts-recompute", "fastdarts-hvp-batched"},
        "hvp/cifar-b64": {"fastdarts", "fastdarts-batched", "fastdarts-reference-cells", "reference"},
        "op/mixed_op/2x4x4x4/forward+backward": {"fastdarts", "reference"},
        "op/partial_channel/2x8x4x4x2x4/forward": {"fastdarts", "reference", "copy"},
        "compat/darts": {"fastdarts", "original"},
    }
    assert {name: set(impls) for name, impls in results["cases"].items()} == expected
    for impls in results["cases"].values():
        for r in impls.values():
            assert "error" not in r and r["ms"] > 0 and r["runs"] >= 1 and r["peak_gib"] is None
    step = results["cases"]["step/cifar-b64/first"]  # batched cells: a fraction of the reference's launches
    assert 0 < step["fastdarts-batched"]["aten_calls"] < step["reference"]["aten_calls"] / 2
    agreement = results["agreement"]
    # Adam moves each alpha by at most about its learning rate (3e-4) per step, whatever the gradient
    assert 0 <= agreement["max_abs_alpha_diff"] < 2 * agreement["steps"] * 3e-4
    assert 0 <= agreement["reference_reordered_diff"] < 2 * agreement["steps"] * 3e-4
    assert agreement["within_1e-3"] == (agreement["max_abs_alpha_diff"] <= 1e-3)
    table = capsys.readouterr().out
    assert "| step/cifar-b64/first (reference) |" in table and "second/first order (fastdarts)" in table
    assert "second/first order (fastdarts-hvp-batched)" in table
    assert "| step/cifar-b64/second (fastdarts-bf16 vs reference) |" in table
    svg = tmp_path / "speedups.svg"
    assert run.main(["--report", str(out), "--plot", str(svg)]) == 0
    assert "| hvp/cifar-b64 (reference) |" in capsys.readouterr().out
    pairs = run.speedups(results)
    assert len(pairs) == sum(
        len(i - set(run.BASELINES)) * len(i & set(run.BASELINES)) for i in expected.values()
    )
    drawing = svg.read_text()
    assert drawing.count("<rect") == len(pairs) and all(f">{ratio:.2f}x<" in drawing for _, ratio in pairs)


def test_a_failing_case_is_recorded_and_the_suite_goes_on(tmp_path, monkeypatch):
    def out_of_memory(impl, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    broken = run.Case("op/broken", ("fastdarts",), out_of_memory)
    works = run.Case("op/works", ("fastdarts",), lambda impl, device: lambda: torch.ones(4).sum())
    monkeypatch.setattr(run, "cases", lambda *args: {c.name: c for c in (broken, works)})
    out = tmp_path / "suite.json"
    assert run.main([*QUICK, "--only", "op/*", "--out", str(out)]) == 0
    cases = json.loads(out.read_text())["cases"]
    assert cases["op/broken"]["fastdarts"] == {
        "error": "out of memory: CUDA out of memory. Tried to allocate 20.00 GiB"
    }
    assert cases["op/works"]["fastdarts"]["ms"] > 0


def test_merge_keeps_the_cases_measured_before(tmp_path):
    out = tmp_path / "suite.json"
    assert run.main([*QUICK, "--only", "op/mixed_op/2x4x4x4/*", "--out", str(out)]) == 0
    first = json.loads(out.read_text())
    assert run.main([*QUICK, "--only", "op/mixed_op/2x8x4x4/*", "--out", str(out), "--merge"]) == 0
    merged = json.loads(out.read_text())
    assert set(merged["cases"]) == {
        "op/mixed_op/2x4x4x4/forward+backward",
        "op/mixed_op/2x8x4x4/forward+backward",
    }
    assert (
        merged["cases"]["op/mixed_op/2x4x4x4/forward+backward"]
        == first["cases"]["op/mixed_op/2x4x4x4/forward+backward"]
    )
    assert merged["earlier"] == [{"environment": first["environment"], "config": first["config"]}]
    assert (
        run.main([*QUICK, "--only", "op/mixed_op/2x8x4x4/*", "--out", str(out)]) == 0
    )  # without --merge: anew
    assert set(json.loads(out.read_text())["cases"]) == {"op/mixed_op/2x8x4x4/forward+backward"}


def test_impls_runs_only_those_and_merge_keeps_the_others(tmp_path):
    out, only = tmp_path / "suite.json", ["--only", "op/mixed_op/2x4x4x4/*"]
    assert run.main([*QUICK, *only, "--out", str(out), "--impls", "ref*"]) == 0
    first = json.loads(out.read_text())["cases"]["op/mixed_op/2x4x4x4/forward+backward"]
    assert set(first) == {"reference"}
    assert run.main([*QUICK, *only, "--out", str(out), "--impls", "fastdarts", "--merge"]) == 0
    merged = json.loads(out.read_text())["cases"]["op/mixed_op/2x4x4x4/forward+backward"]
    assert set(merged) == {"fastdarts", "reference"} and merged["reference"] == first["reference"]


def test_profile_step_lists_the_iterations_ops(capsys):
    from benchmarks import profile_step

    assert profile_step.main(["--device", "cpu", "--quick", "--rows", "5", "--order", "second"]) == 0
    out = capsys.readouterr().out
    assert "cifar-b64 second order, backend auto, cells edge by edge, 1 iterations on cpu" in out
    assert "Self CPU" in out
    assert profile_step.main(["--device", "cpu", "--quick", "--batched", "--traffic", "--rows", "3"]) == 0
    out = capsys.readouterr().out
    calls, gb = re.search(r"per iteration: (\d+) ATen calls, ([\d.]+) GB", out).groups()
    assert "cells batched" in out and int(calls) > 100 and float(gb) > 0 and len(re.findall(r" GB +\d+ calls", out)) == 3
    assert profile_step.main(["--device", "cpu", "--steps", "0"]) == 2
    assert "--steps 0 and --rows 25 must be at least 1" in capsys.readouterr().err


def test_a_first_call_past_the_timeout_is_recorded():
    def never_finishes():
        while True:
            pass

    r = run.measure(lambda: never_finishes, torch.device("cpu"), warmup=1, min_time=0.01, timeout=1)
    assert r == {"error": "the first call did not finish within 1 s"}


def test_list_names_the_cases_without_running_them(capsys):
    assert run.main(["--device", "cpu", "--quick", "--list", "--only", "step/*"]) == 0
    names = capsys.readouterr().out.split()
    assert names == [f"step/{net}/{order}" for net, order in run.STEPS]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "gpu0"], "'gpu0' is not a device"),
        (["--only", "step/mnist*"], "matches no case"),
        (["--only", "op/*", "--impls", "fastdart"], "--impls 'fastdart' matches no impl of the selected cases"),
        (["--warmup", "0"], "--warmup 0 is too small, expected at least 1"),
        (["--min-time", "-1"], "--min-time -1.0 is too small"),
        (["--report", "nowhere.json"], "--report 'nowhere.json' is not a results file that can be read"),
        (["--report", "README.md"], "--report 'README.md' is not a results file that can be read"),
        (["--report", "pyproject.toml"], "--report 'pyproject.toml' is not a results file that can be read"),
        (["--report", "benchmarks/results/cpu-2core-epyc-torch2.14.1-compat.json"], "KeyError('cases')"),
    ]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA device is available")]),
)
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    assert run.main([*args, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "x.json").exists()


def test_report_prints_the_ratios_of_a_results_file_and_refuses_others():
    script = [sys.executable, "benchmarks/report.py"]
    good = subprocess.run([*script, "benchmarks/results/cpu-2core-epyc-torch2.14.1-compat-fused.json"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert good.returncode == 0
    assert re.search(r"^pcdarts search loop, first order, .* -> \d+\.\d\dx$", good.stdout, re.MULTILINE)
    bad = subprocess.run([*script, "README.md"], capture_output=True, text=True, check=False)
    assert (
        bad.returncode == 2
        and bad.stderr.count("\n") == 1
        and "'README.md' is not a pytest-benchmark" in bad.stderr
    )
