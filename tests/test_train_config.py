"""Config layering, the model registry and the command line's argument errors
(no training here)."""
import subprocess
import sys

import pytest
import yaml

from fastmod.train import cli, config, registry
from fastmod.train.config import UsageError


def _resolve(argv):
    return cli.resolve_config(cli.build_parser().parse_args(argv))


def test_merge_rejects_unknown_keys_and_wrong_types():
    base = {"train": {"lr": 1e-3, "epochs": 3, "amp": "none", "steps": None, "dims": [1]}}
    with pytest.raises(UsageError, match=r"unknown config key 'train.lrr'.*known keys here: amp, dims"):
        config.merge(base, {"train": {"lrr": 1}}, "--set")
    with pytest.raises(UsageError, match="unknown config key 'trian'"):
        config.merge(base, {"trian": {}}, "--set")
    with pytest.raises(UsageError, match="'train.epochs' expects a int"):
        config.merge(base, {"train": {"epochs": "many"}}, "--set")
    with pytest.raises(UsageError, match="'train.epochs' expects a int"):
        config.merge(base, {"train": {"epochs": True}}, "--set")
    with pytest.raises(UsageError, match="'train.dims' expects a list"):
        config.merge(base, {"train": {"dims": 3}}, "--set")
    out = config.merge(base, {"train": {"lr": "1e-4", "epochs": 5, "steps": 7}}, "--set")
    assert out["train"] == {"lr": 1e-4, "epochs": 5, "amp": "none", "steps": 7, "dims": [1]}
    assert base["train"]["lr"] == 1e-3  # merge copies


def test_parse_set():
    assert config.parse_set(["train.lr=1e-3", "model.fc_dims=[512, 256]", "data.data_dir=null"]) == {
        "train": {"lr": "1e-3"}, "model": {"fc_dims": [512, 256]}, "data": {"data_dir": None}}  # typed by merge
    for bad in ["train.lr", "=3", "train..lr=1", "model.fc_dims=[1,"]:
        with pytest.raises(UsageError):
            config.parse_set([bad])


def test_layers_and_presets(tmp_path):
    cfg, spec = _resolve([])
    assert spec.name == "cnn-lstm" and cfg["model_name"] == "cnn-lstm"
    assert cfg["model"]["rnn_dim"] == registry.get("cnn-lstm").quick["model"]["rnn_dim"]  # quick preset
    assert cfg["data"]["image_size"] == 64
    paper, _ = _resolve(["--data-dir", str(tmp_path)])
    assert paper["model"]["rnn_dim"] == 256 and paper["model"]["wordvec_dim"] == 300  # clevr-iep
    assert paper["optim"]["lr"] == 5e-4 and paper["train"]["batch_size"] == 64
    cfile = tmp_path / "c.yaml"
    cfile.write_text("train:\n  epochs: 7\n  seed: 3\noptim:\n  lr: 0.01\n")
    cfg, _ = _resolve(["--config", str(cfile), "--set", "train.epochs=9", "--seed", "5", "--amp", "bf16",
                       "--on-nonfinite", "skip"])
    assert cfg["train"]["epochs"] == 9 and cfg["train"]["seed"] == 5 and cfg["optim"]["lr"] == 0.01
    assert cfg["train"]["amp"] == "bf16" and cfg["train"]["nonfinite"] == "skip"
    with pytest.raises(UsageError, match="train.nonfinite"):
        _resolve(["--set", "train.nonfinite=ignore"])
    with pytest.raises(UsageError, match="train.batch_size"):
        _resolve(["--set", "train.batch_size=0"])


def test_registry_names_and_errors():
    assert {"lstm", "cnn-lstm"} <= set(registry.names())
    with pytest.raises(UsageError, match="unknown model 'resnet'"):
        registry.get("resnet")
    for name in registry.PLANNED:
        with pytest.raises(UsageError, match="not implemented yet"):
            registry.get(name)


def test_every_option_has_help():
    parser = cli.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        for opt in action.option_strings:
            assert opt in text
        assert action.help, f"{action.option_strings} has no help"
    for needed in ["--model", "--data-dir", "--features-h5", "--config", "--set", "--out", "--resume", "--device",
                   "--amp", "--compile", "--seed", "--deterministic", "--epochs", "--steps", "--on-nonfinite"]:
        assert needed in text
    assert "torchrun" in text


@pytest.mark.parametrize("argv, message", [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--model", "stack-nmn"], "not implemented yet"),
    (["--data-dir", "/does/not/exist"], "data directory '/does/not/exist' does not exist"),
    (["--set", "train.nope=1"], "unknown config key 'train.nope'"),
    (["--set", "train.epochs"], "--set expects key=value"),
    (["--set", "train.epochs=abc"], "'train.epochs' expects a int"),
    (["--amp", "fp8"], "invalid choice"),
    (["--resume", "/does/not/exist"], "no config.yaml"),
    (["--config", "/does/not/exist.yaml"], "does not exist"),
])
def test_bad_arguments_one_line_status_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastmod.train: error: "), err
    assert message in err


def test_bad_arguments_subprocess(tmp_path):
    """The real entry point: one line on stderr, exit status 2, no traceback."""
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "fastmod.train", "--data-dir",
                        str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "does not exist" in lines[0], r.stderr


def test_print_config_and_list_models(capsys):
    assert cli.main(["--model", "lstm", "--print-config", "--set", "train.epochs=4"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model_name"] == "lstm" and cfg["train"]["epochs"] == 4 and set(cfg) >= set(config.SECTIONS)
    assert cli.main(["--list-models"]) == 0
    out = capsys.readouterr().out
    assert "cnn-lstm" in out and "lnmn-14" in out and "not implemented yet" in out
