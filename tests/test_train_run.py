"""End-to-end runs of ``python -m fastmod.train`` / ``fastmod.evaluate`` on a tiny
generated dataset: smoke runs per model, evaluation output, exact resume,
interrupts, non-finite losses, mixed precision."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _train_helpers import data_cache, tiny_args  # noqa: F401

from fastmod import evaluate as evaluate_cli
from fastmod.train import cli, loop, registry

RUN_FILES = {"config.yaml", "vocab.json", "metrics.jsonl", "last.pt", "best.pt", "results.json", "loss.png",
             "accuracy.png"}


def _weights(run_dir, name="last.pt"):
    return torch.load(run_dir / name, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("model", registry.names())
def test_smoke_every_model(model, data_cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(tiny_args(data_cache, out, model)) == 0
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    text = capsys.readouterr().out
    assert "majority answer" in text and "Q-type majority" in text and "Compare Attribute" in text
    res = json.loads((out / "results.json").read_text())
    assert res["model"] == model and 0 <= res["final"]["overall"] <= 1
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in recs}
    assert {"train", "val", "end"} <= kinds
    train = [r for r in recs if r["kind"] == "train"]
    assert all(k in train[0] for k in ("loss", "acc", "samples_per_s", "lr"))


def test_evaluate_output(data_cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(tiny_args(data_cache, out, "cnn-lstm", epochs=1)) == 0
    capsys.readouterr()
    assert evaluate_cli.main(["--checkpoint", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Overall" in printed and "query_color" in printed and "equal_shape" in printed
    res = json.loads((out / "eval_val.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert res["split"] == "val" and res["model"] == "cnn-lstm" and res["checkpoint"].endswith("best.pt")
    assert set(res["types"]) == {"count", "exist", "compare_number", "query_attribute", "compare_attribute"}
    assert len(res["subtypes"]) == 13
    assert 0 <= res["overall"] <= 1 and res["num_questions"] == 16
    # Same numbers as the training run's own final validation of that checkpoint.
    final = json.loads((out / "results.json").read_text())
    if final["best"]["step"] == final["step"]:
        assert res["overall"] == pytest.approx(final["final"]["overall"])
    assert evaluate_cli.main(["--checkpoint", str(tmp_path / "nothing")]) == 2


def test_resume_after_interrupt_is_exact(data_cache, tmp_path, monkeypatch, capsys):
    """An interrupted (SIGINT at step 5) and resumed run ends with exactly the weights
    and optimiser state of an uninterrupted one; dropout makes RNG state matter."""
    extra = ["model.fc_dropout=0.3", "model.rnn_dropout=0.0"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert cli.main(tiny_args(data_cache, ref, "cnn-lstm", *extra, epochs=3)) == 0

    original = loop.Trainer._train_step

    def step_then_signal(self, batch, window):
        stepped = original(self, batch, window)
        if self.step == 4:  # the 5th step: the handler runs, the step completes, then the save
            os.kill(os.getpid(), signal.SIGINT)
        return stepped

    monkeypatch.setattr(loop.Trainer, "_train_step", step_then_signal)
    assert cli.main(tiny_args(data_cache, cut, "cnn-lstm", *extra, epochs=3)) == 130
    assert "--resume" in capsys.readouterr().out
    assert _weights(cut)["step"] == 5
    monkeypatch.undo()
    assert cli.main(["--resume", str(cut), "--no-progress"]) == 0

    a, b = _weights(ref), _weights(cut)
    assert a["step"] == b["step"] == 18
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optim"]["optimizers"]["main"]["state"], b["optim"]["optimizers"]["main"]["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"])
    # The resumed run's log has no duplicated steps.
    steps = [json.loads(x)["step"] for x in (cut / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == sorted(set(steps))


@pytest.mark.parametrize("sig, workers", [(signal.SIGTERM, 0), (signal.SIGINT, 1)])
def test_signal_saves_and_exits_cleanly(sig, workers, data_cache, tmp_path):
    """SIGTERM to the main process, or SIGINT to the whole process group (Ctrl-C,
    DataLoader worker included): a checkpoint, a clean exit, status 128 + signal."""
    out = tmp_path / "run"
    args = tiny_args(data_cache, out, "lstm", "train.log_every=1", f"data.num_workers={workers}", epochs=100000)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "fastmod.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        log = out / "metrics.jsonl"
        while time.time() < deadline and not (log.exists() and '"train"' in log.read_text()):
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr and "checkpoint saved" in stdout
    ck = _weights(out)
    assert ck["step"] >= 1


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss(policy, data_cache, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    original = loop.split_output

    def poisoned(out):
        logits, aux = original(out)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3:
                logits = logits * float("nan")
        return logits, aux

    monkeypatch.setattr(loop, "split_output", poisoned)
    out = tmp_path / "run"
    rc = cli.main(tiny_args(data_cache, out, "lstm", f"train.nonfinite={policy}", epochs=1))
    err = capsys.readouterr().err
    if policy == "stop":
        assert rc == 1 and "non-finite loss" in err and "at step 3 " in err
    else:
        assert rc == 0
        ck = _weights(out)
        assert ck["skipped"] == 1 and ck["step"] == 5  # 6 batches, one skipped
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs(amp, data_cache, tmp_path):
    out = tmp_path / "run"
    assert cli.main(tiny_args(data_cache, out, "cnn-lstm", steps=3) + ["--amp", amp]) == 0
    ck = _weights(out)
    assert (ck["scaler"] is not None) == (amp == "fp16")
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_precomputed_features(data_cache, tmp_path):
    """--features-h5 with a {split} template: the CNN sees feature maps, not pixels."""
    import h5py
    import numpy as np

    for split, n in (("train", 12), ("val", 4)):
        with h5py.File(tmp_path / f"{split}_features.h5", "w") as f:
            f["features"] = np.random.default_rng(0).standard_normal((n, 6, 4, 4)).astype(np.float32)
    out = tmp_path / "run"
    args = tiny_args(data_cache, out, "cnn-lstm", steps=2) + [
        "--features-h5", str(tmp_path / "{split}_features.h5")]
    assert cli.main(args) == 0
    ck = _weights(out)
    assert ck["visual_key"] == "features" and ck["visual_shape"] == [6, 4, 4]
    assert not any(k.startswith("cnn.0.0.") for k in ck["model"])  # no pixel stem
    assert evaluate_cli.main(["--checkpoint", str(out / "last.pt"), "--no-progress",
                              "--features-h5", str(tmp_path / "{split}_features.h5")]) == 0


def test_registering_a_two_optimiser_model(data_cache, tmp_path):
    """What a later model (e.g. LNMN) does: a spec with its own optimiser scheme
    and config keys; the command trains it, alternating the two optimisers."""
    from fastmod.models.baselines import LstmModel
    from fastmod.train.optim import OptimScheme

    def build(cfg, ctx):
        return LstmModel(ctx.num_tokens, ctx.num_answers, wordvec_dim=cfg["dim"], rnn_dim=cfg["dim"],
                         rnn_num_layers=1, fc_dims=[cfg["dim"]])

    def scheme(model, optim_cfg):
        head = list(model.classifier.parameters())
        rest = list(model.rnn.parameters())
        return OptimScheme({"weights": torch.optim.Adam(rest, lr=optim_cfg["lr"]),
                            "head": torch.optim.SGD(head, lr=optim_cfg["head"]["lr"])},
                           active=lambda step: ("weights",) if step % 2 == 0 else ("head",))

    spec = registry.ModelSpec(name="toy-2opt", description="test", build=build, optimizers=scheme,
                              defaults={"model": {"dim": 8}, "optim": {"head": {"lr": 0.05}}})
    registry.register(spec)
    try:
        out = tmp_path / "run"
        args = tiny_args(data_cache, out, "toy-2opt", steps=4, tiny_model=False)
        assert cli.main(args + ["--set", "optim.head.lr=0.1"]) == 0
        ck = _weights(out)
        assert set(ck["optim"]["optimizers"]) == {"weights", "head"}
        assert ck["config"]["optim"]["head"]["lr"] == 0.1
        head_state = ck["optim"]["optimizers"]["weights"]["state"]
        assert all(int(s["step"]) == 2 for s in head_state.values())  # stepped on steps 0 and 2 only
    finally:
        registry._REGISTRY.pop("toy-2opt")


def test_deterministic_runs_repeat_and_settings_restored(data_cache, tmp_path):
    """Same seed, same weights; --deterministic is undone when an in-process run returns."""
    for name in ("a", "b"):
        assert cli.main(tiny_args(data_cache, tmp_path / name, "cnn-lstm", steps=3) + ["--deterministic"]) == 0
    assert not torch.are_deterministic_algorithms_enabled()
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert cli.main(tiny_args(data_cache, tmp_path / "c", "cnn-lstm", steps=3) + ["--seed", "1"]) == 0
    c = _weights(tmp_path / "c")
    assert not all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_cuda_run_and_evaluate(amp, data_cache, tmp_path):
    out = tmp_path / "run"
    assert cli.main(tiny_args(data_cache, out, "cnn-lstm", steps=4) + ["--device", "cuda", "--amp", amp]) == 0
    ck = _weights(out)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert evaluate_cli.main(["--checkpoint", str(out), "--device", "cuda", "--no-progress"]) == 0
