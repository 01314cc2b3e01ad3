"""The `fastdarts` command: a real run, and one-line usage errors with exit status 2."""

import subprocess
import sys

import pytest

from fastdarts.cli import main


def _run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fastdarts", *args], capture_output=True, text=True, cwd=cwd, check=False
    )


def test_search_prints_genotype_and_writes_files(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["search", "--data", "digits", "--layers", "3", "--init-channels", "4", "--epochs", "1",
                 "--batch-size", "450", "--device", "cpu", "--no-progress", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.startswith("Genotype(normal=[(")
    assert {p.name for p in out.iterdir()} == {"checkpoint.pt", "genotype.json", "alphas.pt"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["search", "--algo", "enas", "--out", "x"], "invalid choice: 'enas'"),
        (["search", "--batch-size", "0", "--out", "x"], "batch_size must be a whole number >= 1, got 0"),
        (["search", "--data", "cifar10", "--out", "x"], "cifar10 needs --data-dir"),
        (
            ["search", "--data", "cifar10", "--data-dir", "/nonexistent/cifar", "--out", "x"],
            "/nonexistent/cifar",
        ),
        (["search", "--out", "x", "--resume"], "no checkpoint to resume"),
        (["search", "--epochs", "two", "--out", "x"], "invalid int value: 'two'"),
        (
            ["search", "--algo", "pcdarts", "--partial-channels", "3", "--out", "x"],
            "not a multiple of partial",
        ),
        (["search", "--space", "darts-imagenet", "--out", "x"], "image size 8 is halved at an odd size"),
        (["search", "--cuda-graphs", "--device", "cpu", "--out", "x"], "cuda_graphs needs a CUDA device"),
        (["search", "--seed", "-5", "--out", "x"], "seed must be a whole number in [0, 2**32), got -5"),
        (["search", "--out", "afile/x"], "output folder 'afile/x' cannot be made: Not a directory"),
        (["search", "--out", "afile"], "output folder 'afile' cannot be made: File exists"),
        (["search", "--momentum", "nan", "--out", "x"], "momentum must be a finite number, got nan"),
        (["search", "--device", "meta", "--out", "x"], "device 'meta' is not supported"),
        (["search", "--hvp", "exact", "--out", "x"], "hvp 'exact' is for order second"),
    ],
)
def test_usage_errors_are_one_line_with_exit_status_2(tmp_path, args, message):
    (tmp_path / "afile").write_text("")  # (a file where a folder is expected)
    result = _run(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in lines[0]


def test_every_search_setting_has_its_flag():
    from fastdarts.cli import _build_parser, _config
    from fastdarts.search import SearchConfig

    parser = _build_parser()
    flags = [
        "--space", "darts-imagenet", "--algo", "rf-pcdarts", "--order", "second", "--hvp", "fd-batched",
        "--partial-channels", "2", "--data", "cifar10", "--data-dir", "d", "--workers", "3",
        "--train-portion", "0.6", "--epochs", "7", "--batch-size", "9", "--seed", "5", "--layers", "4",
        "--init-channels", "12", "--lr", "0.2", "--lr-min", "0.01", "--momentum", "0.8", "--weight-decay", "0.1",
        "--grad-clip", "3", "--arch-lr", "0.5", "--arch-weight-decay", "0.2", "--arch-warmup-epochs", "2",
        "--device", "cpu", "--track-eigenvalue", "--early-stop", "eigenvalue", "--amp", "bf16",
        "--channels-last", "--cuda-graphs", "--recompute-edges", "--image-size", "64",
    ]  # fmt: skip
    config = _config(parser.parse_args(["search", "--out", "x", *flags]))
    default = SearchConfig()
    # every setting has a flag that reaches it (a renamed field or flag would leave its default here)
    changed = {f for f in vars(config) if getattr(config, f) != getattr(default, f)}
    assert changed == set(vars(default))
    assert (config.hvp, config.track_eigenvalue, config.data_dir, config.image_size) == (
        "fd-batched",
        True,
        "d",
        64,
    )


def test_corrupt_checkpoint_is_a_usage_error(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "checkpoint.pt").write_bytes(b"\x00garbage")
    result = _run("search", "--out", "x", "--resume", cwd=tmp_path)
    assert result.returncode == 2 and "corrupt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_stopped_search_says_in_one_line_what_it_left(tmp_path, capsys, monkeypatch, checkpointed):
    import fastdarts.cli

    out = tmp_path / "run"
    if checkpointed:
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(b"")
    left = (
        "run/checkpoint.pt (--resume)"
        if checkpointed
        else "no epoch had finished, so there is nothing to resume"
    )
    for error, code, first in ((KeyboardInterrupt(), 130, "fastdarts: interrupted; "),
                               (FloatingPointError("training loss became nan in epoch 1, batch 2"), 1,
                                "fastdarts: error: training loss became nan in epoch 1, batch 2; try a lower --lr")):  # fmt: skip

        def stop(args, error=error):
            raise error

        monkeypatch.setattr(fastdarts.cli, "_search", stop)
        assert main(["search", "--out", str(out)]) == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(first) and left in err, err


def test_info_reports_backends():
    result = _run("info")
    assert result.returncode == 0
    assert '"cpp"' in result.stdout and '"backend": "auto"' in result.stdout
