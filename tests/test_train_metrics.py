"""Per-type accuracy, baselines, tables, plots and atomic checkpoints."""
import math

import pytest
import torch

from fastmod.train import checkpoint, metrics, plots

TYPES = ("count", "exist", "compare_number", "query_attribute", "compare_attribute")
SUBTYPES = ("exist", "count", "equal_integer", "less_than", "greater_than", "query_size", "query_color",
            "query_material", "query_shape", "equal_size", "equal_color", "equal_material", "equal_shape")


def test_typed_accuracy_counts():
    acc = metrics.TypedAccuracy(TYPES, SUBTYPES)
    pred = torch.tensor([1, 2, 3, 4])
    ans = torch.tensor([1, 0, 3, 4])
    acc.update(pred, ans, ["count", "count", "exist", "unknown"], ["count", "count", "exist", "unknown"],
               loss_sum=torch.tensor(8.0))
    s = acc.summary()
    assert s["overall"] == 0.75 and s["num_questions"] == 4 and s["loss"] == 2.0
    assert s["types"]["count"] == 0.5 and s["types"]["exist"] == 1.0
    assert math.isnan(s["types"]["compare_number"])
    assert s["subtypes"]["count"] == 0.5 and s["counts"]["subtypes"]["count"] == 2
    assert set(s["types"]) == set(TYPES) and set(s["subtypes"]) == set(SUBTYPES)


def test_majority_baselines():
    train_a = [0, 0, 0, 1, 1, 2]
    train_t = ["exist", "exist", "exist", "count", "count", "count"]
    out = metrics.majority_baselines(train_a, train_t, [0, 1, 2], ["exist", "count", "count"],
                                     ["exist", "count", "count"], TYPES, SUBTYPES)
    assert out["majority"]["overall"] == pytest.approx(1 / 3)   # always 0
    assert out["qtype"]["overall"] == pytest.approx(2 / 3)      # exist->0, count->1
    assert out["qtype"]["types"]["count"] == 0.5


def test_format_table():
    acc = metrics.TypedAccuracy(TYPES, SUBTYPES)
    acc.update(torch.tensor([1]), torch.tensor([1]), ["exist"], ["exist"])
    text = metrics.format_table([("model", acc.summary())], TYPES)
    lines = text.splitlines()
    assert "Overall" in lines[0] and "Compare Numbers" in lines[0] and "Query Attribute" in lines[0]
    assert "100.0" in lines[1] and lines[1].startswith("model")
    assert "subtype" in metrics.format_subtypes(acc.summary())


def test_plots_with_pillow(tmp_path, monkeypatch):
    def no_matplotlib(*a, **k):
        raise ImportError("no matplotlib")

    monkeypatch.setattr(plots, "_plot_matplotlib", no_matplotlib)
    recs = [{"kind": "train", "step": s, "loss": 2.0 / s, "acc": 0.1 * s} for s in range(1, 6)]
    recs += [{"kind": "val", "step": 5, "loss": 0.5, "acc": 0.4}, {"kind": "train", "step": 6, "loss": float("nan")}]
    paths = plots.save_plots(recs, tmp_path)
    assert sorted(p.name for p in paths) == ["accuracy.png", "loss.png"]
    from PIL import Image

    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (640, 400)


def test_metrics_log_jsonl(tmp_path):
    log = metrics.MetricsLog(tmp_path, tensorboard=False)
    log.log("train", 3, loss=1.5, acc=0.5)
    log.log("val", 3, types={"count": 0.25})
    log.close()
    recs = metrics.read_log(tmp_path / "metrics.jsonl")
    assert recs[0]["kind"] == "train" and recs[0]["step"] == 3 and recs[1]["types"] == {"count": 0.25}


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "x": 1}, path)
    assert checkpoint.load(path)["x"] == 1

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_save({"format": checkpoint.FORMAT, "x": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["x"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left


def test_checkpoint_resolve_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no best.pt"):
        checkpoint.resolve(tmp_path)
    torch.save({"not": "ours"}, tmp_path / "last.pt")
    assert checkpoint.resolve(tmp_path) == tmp_path / "last.pt"
    with pytest.raises(ValueError, match="not a fastmod training checkpoint"):
        checkpoint.load(tmp_path / "last.pt")


def test_rng_state_round_trip():
    state = checkpoint.rng_state()
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    checkpoint.set_rng_state(state)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
