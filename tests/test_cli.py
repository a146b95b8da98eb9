"""The command-line surface shared by every CLI (``interp.cli``): one error line and exit 2 for bad input,
checked before any work starts; 130 on Ctrl-C; ``--debug`` for tracebacks; ``--help`` without torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from interp.cache.__main__ import main as cache_main
from interp.evaluate.__main__ import main as evaluate_main
from interp.models.tiny import main as tiny_main
from interp.models.train_cli import main as train_main
from interp.models.train_clip import main as train_clip_main
from interp.nast.__main__ import main as nast_main
from interp.trace.__main__ import main as trace_main
from interp.trace.__main__ import parse_args

CLIS = ["interp.trace", "interp.evaluate", "interp.cache", "interp.attribution", "interp.nast", "interp.models.train", "interp.models.train_clip", "interp.report",
        "interp.models.tiny"]
WEIGHTS = Path(__file__).parents[1] / "interp" / "models" / "weights"
CLIP_DIR, LVLM_DIR = WEIGHTS / "clip", WEIGHTS / "lvlm"


def tree(path: Path) -> dict[str, bytes | None]:
    """Everything under ``path``: files with their bytes, folders as None."""
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def one_line(main, argv: list[str], capsys, code: int = 2) -> str:
    """Run a CLI in-process: exit ``code`` and one line on stderr, no traceback; returns the line."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def place(tmp_path: Path) -> Path:
    """A folder holding a file ``f`` (bytes b"keep") and a folder ``d`` (holding ``x``)."""
    (tmp_path / "f").write_bytes(b"keep")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_bytes(b"keep")
    return tmp_path


# ---------------------------------------------------------------------------------------
# --out checked first: one line, nothing made or changed


OUT_DIR_CLIS = [(trace_main, []), (cache_main, []), (nast_main, ["trace"]), (tiny_main, ["--family", "llava"]),
                (train_main, ["--steps", "1"]), (train_clip_main, ["--steps", "1"])]


@pytest.mark.parametrize("main,argv", OUT_DIR_CLIS)
@pytest.mark.parametrize("out,message", [("f", "f is a file, not a folder"), ("f/sub", "lies under"),
                                         ("f/sub/deeper", "which is a file")])
def test_out_folder_that_is_or_sits_under_a_file(main, argv, out, message, place, capsys):
    before = tree(place)
    assert message in one_line(main, [*argv, "--out", str(place / out)], capsys)
    assert tree(place) == before


@pytest.mark.parametrize("main,argv", OUT_DIR_CLIS)
def test_out_not_writable(main, argv, place, capsys, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != place / "d")  # also as root
    before = tree(place)
    assert "is not writable" in one_line(main, [*argv, "--out", str(place / "d" / "new")], capsys)
    assert tree(place) == before


def test_out_file_that_is_a_folder(place, capsys):
    before = tree(place)
    assert "d is a folder, not a file" in one_line(nast_main, ["train", "--out", str(place / "d")], capsys)
    assert "lies under" in one_line(nast_main, ["train", "--out", str(place / "f" / "run.json")], capsys)
    assert tree(place) == before


def test_store_urls(place, capsys):
    from interp.cli import out_store

    assert out_store("memory://x.zarr") == "memory://x.zarr"  # fsspec URLs go through to the store
    assert "Protocol not known: nowhere" in one_line(cache_main, ["--out", "nowhere://x.zarr"], capsys)
    before = tree(place)
    assert "f is a file, not a folder" in one_line(cache_main, ["--out", str(place / "f")], capsys)
    assert tree(place) == before


def test_default_cache_out_checked_first(place, capsys, monkeypatch):
    """The default ``caches/<model>-<data>.zarr`` is checked before the data set or model loads."""
    monkeypatch.chdir(place)
    (place / "caches").write_text("")
    assert "lies under caches, which is a file" in one_line(cache_main, ["--data", "nowhere.json"], capsys)


# ---------------------------------------------------------------------------------------
# --device


def test_unknown_device(capsys):
    for main in (trace_main, cache_main):
        assert "unknown device 'bogus'" in one_line(main, ["--device", "bogus"], capsys)


def test_cuda_without_cuda(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "cuda", None)
    assert "this torch build has no CUDA" in one_line(trace_main, ["--device", "cuda"], capsys)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "has 1 CUDA GPU(s), cuda:0 to cuda:0" in one_line(cache_main, ["--device", "cuda:3"], capsys)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert "no CUDA GPU is visible" in one_line(trace_main, ["--device", "cuda:0"], capsys)


# ---------------------------------------------------------------------------------------
# numeric options: checked at parse time


@pytest.mark.parametrize("main,argv,message", [
    (nast_main, ["trace", "--seeds", "a,b"], "--seeds: must be comma-separated integers >= 0"),
    (nast_main, ["trace", "--seeds", ","], "--seeds: must be comma-separated integers >= 0"),
    (nast_main, ["trace", "--seeds", "0,-1"], "--seeds: must be comma-separated integers >= 0"),
    (nast_main, ["trace", "--limit", "0"], "--limit: must be an integer >= 1, got '0'"),
    (nast_main, ["trace", "--limit", "-2"], "--limit: must be an integer >= 1, got '-2'"),
    (nast_main, ["trace", "--n-images", "0"], "--n-images: must be an integer >= 1"),
    (nast_main, ["trace", "--min-margin", "-1"], "--min-margin: must be a finite number >= 0"),
    (nast_main, ["train", "--steps", "0"], "--steps: must be an integer >= 1"),
    (nast_main, ["train", "--lr", "0"], "--lr: must be a finite number > 0"),
    (nast_main, ["train", "--momentum", "1.5"], "--momentum: must be a number in [0, 1]"),
    (nast_main, ["train", "--method", "bogus"], "--method: invalid choice: 'bogus'"),
    (nast_main, ["train", "--batch-size", "32", "--n-train", "8"], "batch_size 32 exceeds n_train 8"),
    (train_clip_main, ["--steps", "0"], "--steps: must be an integer >= 1, got '0'"),
    (train_clip_main, ["--n-train", "0"], "--n-train: must be an integer >= 1, got '0'"),
    (train_clip_main, ["--n-train", "8"], "--n-train 8 is less than a batch (64 phantoms)"),
    (train_clip_main, ["--negated-rate", "2"], "--negated-rate: must be a number in [0, 1], got '2'"),
    (train_clip_main, ["--negated-rate", "-1"], "--negated-rate: must be a number in [0, 1], got '-1'"),
    (train_clip_main, ["--eval-images", "0"], "--eval-images: must be an integer >= 1"),
    (train_main, ["--steps", "0"], "--steps: must be an integer >= 1"),
    (train_main, ["--minutes", "0"], "--minutes: must be a finite number > 0"),
    (train_main, ["--aux-steps", "-1"], "--aux-steps: must be an integer >= 0"),
    (train_main, ["--set", "nonsense=1"], "unknown config field 'nonsense'"),
    (trace_main, ["--noise-scale", "-3"], "--noise-scale: must be a finite number > 0, got '-3'"),
    (trace_main, ["--noise-scale", "nan"], "--noise-scale: must be a finite number > 0, got 'nan'"),
    (trace_main, ["--noise-scale", "x"], "--noise-scale: must be a finite number > 0, got 'x'"),
    (trace_main, ["--copies", "0"], "--copies: must be an integer >= 1"),
    (trace_main, ["--window", "0"], "--window: must be an integer >= 1"),
    (trace_main, ["--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    (trace_main, ["--limit", "1.5"], "--limit: must be an integer >= 1, got '1.5'"),
    (trace_main, ["--min-gap", "-0.1"], "--min-gap: must be a finite number >= 0"),
    (trace_main, ["--seed", "-1"], "--seed: must be an integer >= 0"),
    (trace_main, ["--mode", "bogus"], "--mode: invalid choice: 'bogus'"),
    (cache_main, ["--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    (cache_main, ["--chunk-samples", "-4"], "--chunk-samples: must be an integer >= 1"),
    (cache_main, ["--limit", "0"], "--limit: must be an integer >= 1"),
    (tiny_main, ["--family", "llava", "--out", "x", "--seed", "-1"], "--seed: must be an integer >= 0"),
    (tiny_main, ["--out", "x"], "the following arguments are required: --family"),
    (trace_main, ["--bogus"], "unrecognized arguments: --bogus"),
    (evaluate_main, ["--methods", "saliency,magic"], "unknown attribution method 'magic'"),
    (evaluate_main, ["--modes", "direct,chatty"], "--modes: choose direct and/or cot"),
    (evaluate_main, ["--confounder-rate", "1.5"], "--confounder-rate: must be a number in [0, 1]"),
])
def test_bad_numbers_and_usage(main, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = one_line(main, argv, capsys)
    assert err.startswith("error: ") and message in err, err
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------
# options that do not apply are rejected, not ignored


@pytest.mark.parametrize("argv,message", [
    (["--mode", "nast", "--sites", "lm.blocks.0.resid_post", "--metric", "prob"], "--sites, --metric do not apply to --mode nast"),
    (["--mode", "nast", "--lm-positions", "span"], "--lm-positions does not apply to --mode nast"),
    (["--mode", "nast", "--vision-positions", "block2"], "--vision-positions does not apply to --mode nast"),
    (["--mode", "nast", "--copies", "2", "--noise-scale", "1", "--window", "3"],
     "--window, --copies, --noise-scale do not apply to --mode nast"),
    (["--mode", "nast", "--data", "phantom-val"], "--data does not apply to --mode nast"),
    (["--mode", "patch", "--copies", "3"], "--copies does not apply to --mode patch"),
    (["--mode", "patch", "--noise-scale", "2"], "--noise-scale does not apply to --mode patch"),
    (["--prompt", "is there a nodule ?"], "--prompt goes with --image"),
    (["--image", "x.png", "--prompt", "p", "--data", "phantom-val"], "--image and --data are two inputs"),
])
def test_trace_options_that_do_not_apply(argv, message, tmp_path, capsys):
    out = tmp_path / "o"
    assert message in one_line(trace_main, ["--layer-sweep", *argv, "--out", str(out)], capsys)
    assert not out.exists()


def test_layer_sweep_flag_optional_and_model_swap_documented(capsys):
    assert parse_args([]) == parse_args(["--layer-sweep"])
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "with --mode nast the embedded CLIP organism" in help_text and "--layer-sweep" in help_text


@pytest.mark.parametrize("main,argv,message", [
    (train_main, ["--eval-only", "--steps", "5", "--seed", "0"], "--seed, --steps do not apply to --eval-only"),
    (train_main, ["--eval-only", "--set", "lr=1"], "--set does not apply to --eval-only"),
    (train_clip_main, ["--eval-only", "--seed", "0", "--hard-negatives"],
     "--seed, --hard-negatives do not apply to --eval-only"),
    (train_clip_main, ["--eval-only", "--out", "x"], "--out does not apply to --eval-only"),
    (train_clip_main, ["--model", "clip-organism"], "--model does not apply to training"),
])
def test_training_options_that_do_not_apply(main, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert message in one_line(main, argv, capsys)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------
# a model of the wrong kind for the command


@pytest.mark.parametrize("main,argv,message", [
    (nast_main, ["train", "--model", "organism"], "nast train (LoRA on a text encoder) needs a CLIP-style dual encoder"),
    (nast_main, ["trace", "--model", "organism"], "nast trace needs a CLIP-style dual encoder"),
    (train_main, ["--eval-only", "--out", str(CLIP_DIR)], "models.train --eval-only (the LVLM organism's VQA) needs an LVLM"),
    (train_clip_main, ["--eval-only", "--model", "organism"], "train_clip --eval-only (CLIP-style retrieval) needs a CLIP"),
    (trace_main, ["--mode", "nast", "--model", str(LVLM_DIR)], "--mode nast (it traces a text encoder) needs a CLIP"),
])
def test_wrong_kind_of_model(main, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = tree(CLIP_DIR)
    assert message in one_line(main, argv, capsys)
    assert not list(tmp_path.iterdir()) and tree(CLIP_DIR) == before


# ---------------------------------------------------------------------------------------
# one error path: Ctrl-C, unexpected exceptions, --debug


def _raise(exc: BaseException):
    def f(*args, **kwargs):
        raise exc
    return f


@pytest.mark.parametrize("main,target,argv,line", [
    (trace_main, "interp.trace.__main__.sweep", [], "interrupted: rerun the same command to resume"),
    (trace_main, "interp.trace.__main__.nast_sweep", ["--mode", "nast"], "interrupted"),
    (cache_main, "interp.cache.__main__.cache", [], "interrupted: rerun the same command to resume"),
    (nast_main, "interp.nast.__main__.trace", ["trace"], "interrupted"),
    (nast_main, "interp.nast.__main__.train", ["train"], "interrupted"),
    (train_main, "interp.models.train.Trainer", [], "interrupted"),
    (train_clip_main, "interp.models.train_clip.train", [], "interrupted"),
    (tiny_main, "interp.models.tiny.build_tiny", ["--family", "llava"], "interrupted"),
])
def test_ctrl_c_is_one_line_exit_130(main, target, argv, line, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(target, _raise(KeyboardInterrupt()))
    out = tmp_path / "o"
    assert one_line(main, [*argv, "--out", str(out)], capsys, code=130) == line
    assert not out.exists()


def test_ctrl_c_while_caching_leaves_nothing(tmp_path, capsys, monkeypatch):
    """Interrupted before its first chunk is in, a new store is removed (stderr: its bar, then one line)."""
    monkeypatch.setattr("interp.cache.__main__.run_chunk", _raise(KeyboardInterrupt()))
    out = tmp_path / "c.zarr"
    argv = ["--limit", "2", "--chunk-samples", "1", "--sites", "lm.blocks.0.resid_post", "--out", str(out)]
    assert cache_main(argv) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "interrupted: rerun the same command to resume" and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_unexpected_error_is_one_line_and_debug_raises(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("interp.trace.__main__.sweep", _raise(RuntimeError("boom\nsecond line")))
    argv = ["--out", str(tmp_path / "o")]
    assert one_line(trace_main, argv, capsys) == (
        "error: unexpected RuntimeError: boom second line (rerun with --debug for the traceback)")
    with pytest.raises(RuntimeError, match="boom"):
        trace_main([*argv, "--debug"])
    monkeypatch.setattr("interp.trace.__main__.sweep", _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        trace_main([*argv, "--debug"])


# ---------------------------------------------------------------------------------------
# --help without torch; no weight-loading bar


@pytest.mark.parametrize("module,argv", [(m, []) for m in CLIS] + [("interp.nast", ["trace"]), ("interp.nast", ["train"]),
                                                                   ("interp.sae", ["train"]), ("interp.sae", ["analyze"])])
def test_help_imports_no_torch(module, argv):
    """What makes ``--help`` fast: parsing it, as ``python -m`` runs the module, never imports torch."""
    code = (f"import runpy, sys; sys.argv = [{module!r}, *{argv!r}, '--help']\n"
            f"try:\n    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--debug" in res.stdout and res.stdout.split()[-1] == "False", res.stdout[-300:]


def test_no_weight_loading_bar(tmp_path):
    """A command that loads a model and then stops at bad input prints exactly one line."""
    res = subprocess.run([sys.executable, "-m", "interp.trace", "--sites", "lm.blocks.9.resid_post", "--out",
                          str(tmp_path / "o")], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"})
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: layer out of range")
    assert not (tmp_path / "o").exists()
