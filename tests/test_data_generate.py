"""The embedded CLEVR-style generator: layout, round trip through the readers, determinism,
scene constraints, answers re-derived by the executor, default_dataset caching, the CLI."""
import json
import math
from collections import Counter

import pytest
import torch

from fastmod import data
from fastmod.data import default as default_mod
from fastmod.data import generate as cli
from fastmod.data import writer
from fastmod.data.scene import MARGIN, MAX_OBJECTS, MIN_OBJECTS, compute_relationships, project

N_TRAIN, N_VAL, N_TEST, QPI, SIZE = 30, 6, 4, 10, 48


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    return data.generate_dataset(tmp_path_factory.mktemp("gen") / "clevr", n_train=N_TRAIN, n_val=N_VAL,
                                 n_test=N_TEST, seed=3, image_size=SIZE, questions_per_image=QPI,
                                 workers=1, progress=False)


def _load(root, kind, split):
    return json.loads((root / kind / f"CLEVR_{split}_{kind}.json").read_text())


def test_layout_and_counts(gen):
    for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)):
        pngs = sorted((gen / "images" / split).glob("*.png"))
        assert [p.name for p in pngs] == [f"CLEVR_{split}_{i:06d}.png" for i in range(n)]
        qs = _load(gen, "questions", split)["questions"]
        assert len(qs) == n * QPI
        assert [q["question_index"] for q in qs] == list(range(len(qs)))
        for q in qs:
            assert q["split"] == split and q["image_filename"] == f"CLEVR_{split}_{q['image_index']:06d}.png"
            if split == "test":
                assert "answer" not in q and "program" not in q
            else:
                assert {"answer", "program", "question_family_index"} <= set(q)
    assert not (gen / "scenes" / "CLEVR_test_scenes.json").exists()
    from PIL import Image
    with Image.open(gen / "images" / "train" / "CLEVR_train_000000.png") as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"


def test_answers_match_executor_and_are_well_posed(gen):
    for split in ("train", "val"):
        scenes = _load(gen, "scenes", split)["scenes"]
        for q in _load(gen, "questions", split)["questions"]:
            assert data.execute(q["program"], scenes[q["image_index"]]) == q["answer"]
            assert q["answer"] in data.CLEVR_ANSWERS
            assert data.question_type(q["program"])[0] in data.QUESTION_TYPES


def test_all_families_and_types_appear(gen):
    qs = _load(gen, "questions", "train")["questions"]
    assert {q["family"] for q in qs} == set(data.FAMILIES)
    assert {data.question_type(q["program"])[1] for q in qs} == set(data.QUESTION_SUBTYPES)
    # questions about one image are distinct
    per_image = Counter((q["image_index"], q["question"]) for q in qs)
    assert max(per_image.values()) == 1


def test_scene_constraints(gen):
    for s in _load(gen, "scenes", "train")["scenes"]:
        objs = s["objects"]
        assert MIN_OBJECTS <= len(objs) <= MAX_OBJECTS
        assert s["relationships"] == compute_relationships(objs)
        for o in objs:
            assert o["shape"] in ("cube", "sphere", "cylinder") and o["material"] in ("rubber", "metal")
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                (xa, ya, ra), (xb, yb, rb) = a["3d_coords"], b["3d_coords"]
                assert abs(xa - xb) >= MARGIN - 1e-3 and abs(ya - yb) >= MARGIN - 1e-3
                ua, va, sa = project(xa, ya, 1.0)
                ub, vb, sb = project(xb, yb, 1.0)
                assert math.hypot(ua - ub, va - vb) >= ra * sa + rb * sb  # footprints never overlap


def test_rendered_colours_visible(gen):
    """Each object's colour is present near its pixel coordinates (nothing is fully hidden)."""
    import numpy as np
    from PIL import Image

    from fastmod.data.scene import COLOR_RGB
    for s in _load(gen, "scenes", "train")["scenes"][:10]:
        with Image.open(gen / "images" / "train" / s["image_filename"]) as im:
            img = np.asarray(im.convert("RGB"), dtype=np.float32)
        for o in s["objects"]:
            u, v = o["pixel_coords"][:2]
            patch = img[max(0, v - 4):v + 2, max(0, u - 3):u + 4].reshape(-1, 3)
            hue = np.asarray(COLOR_RGB[o["color"]], dtype=np.float32)
            # compare chromaticity: metal is darker but keeps its hue
            cos = (patch @ hue) / (np.linalg.norm(patch, axis=1) * np.linalg.norm(hue) + 1e-6)
            assert cos.max() > 0.97, (s["image_filename"], o)


def test_round_trip_through_readers(gen):
    train = data.read_questions(gen, "train")
    vocab = data.load_or_build_vocab(gen, train)
    assert (gen / "vocab.json").is_file()
    assert vocab.num_answers == 28 and set(vocab.answer_token_to_idx) == set(data.CLEVR_ANSWERS)
    for q in train:  # every training word is in the vocabulary
        assert vocab.question_token_to_idx["<UNK>"] not in vocab.encode_question(q["question"])
    ds = data.ClevrDataset(gen, "train", vocab, image_size=32)
    assert len(ds) == N_TRAIN * QPI and ds.has_answers
    item = ds[5]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert vocab.decode_answer(int(item["answer"])) == train[5]["answer"]
    assert (item["qtype"], item["qsubtype"]) == data.question_type(train[5]["program"])
    answers, types, subtypes = ds.labels()  # the same labels, without reading images
    assert len(answers) == len(ds)
    assert (answers[5], types[5], subtypes[5]) == (int(item["answer"]), item["qtype"], item["qsubtype"])
    val = data.ClevrDataset(gen, "val", vocab, image_size=32)
    assert len(val) == N_VAL * QPI
    test = data.ClevrDataset(gen, "test", vocab, image_size=32)
    assert not test.has_answers and int(test[0]["answer"]) == -1
    assert set(test.qtypes) <= {"count", "unknown"}
    assert data.load_or_build_vocab(gen, None) == vocab  # reused from vocab.json


def test_deterministic_and_independent_of_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "CHUNK", 4)  # several chunks, so two workers share the work
    kw = dict(n_train=9, n_val=0, seed=11, image_size=32, questions_per_image=3, progress=False)
    a = data.generate_dataset(tmp_path / "a", workers=1, **kw)
    b = data.generate_dataset(tmp_path / "b", workers=2, **kw)
    c = data.generate_dataset(tmp_path / "c", workers=1, **{**kw, "seed": 12})
    for rel in ["questions/CLEVR_train_questions.json", "scenes/CLEVR_train_scenes.json",
                "images/train/CLEVR_train_000007.png"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "questions/CLEVR_train_questions.json").read_bytes() != \
        (c / "questions/CLEVR_train_questions.json").read_bytes()


def test_answers_balanced_within_families(tmp_path):
    root = data.generate_dataset(tmp_path / "bal", n_train=150, n_val=0, seed=0, image_size=16,
                                 questions_per_image=10, workers=1, progress=False)
    qs = _load(root, "questions", "train")["questions"]
    by = {}
    for q in qs:
        by.setdefault(q["question_family_index"], Counter())[q["answer"]] += 1
    for k, counts in by.items():
        total = sum(counts.values())
        if set(counts) <= {"yes", "no"} and total >= 30:
            assert max(counts.values()) / total < 0.75, (k, counts)
        elif total >= 30:  # counts and attribute queries: no answer dominates
            assert max(counts.values()) / total < 0.45, (k, counts)


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_train"):
        data.generate_dataset(tmp_path, n_train=-1)
    with pytest.raises(ValueError, match="image_size"):
        data.generate_dataset(tmp_path, n_train=1, image_size=4)
    with pytest.raises(ValueError, match="questions_per_image"):
        data.generate_dataset(tmp_path, n_train=1, questions_per_image=0)


def test_default_dataset_generates_once(tmp_path, monkeypatch):
    calls = []
    real = default_mod.generate_dataset

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **{**k, "progress": False})

    monkeypatch.setattr(default_mod, "generate_dataset", spy)
    p1 = data.default_dataset(tmp_path, n_train=3, n_val=2, image_size=24, seed=1)
    p2 = data.default_dataset(tmp_path, n_train=3, n_val=2, image_size=24, seed=1)
    assert p1 == p2 and len(calls) == 1
    assert (p1 / "questions" / "CLEVR_val_questions.json").is_file()
    p3 = data.default_dataset(tmp_path, n_train=3, n_val=2, image_size=24, seed=2)
    assert p3 != p1 and len(calls) == 2
    monkeypatch.setenv("FASTMOD_CACHE", str(tmp_path / "env"))
    assert data.default_dataset(n_train=3, n_val=2, image_size=24, seed=1).parent == tmp_path / "env"


def test_default_dataset_interrupted_is_not_reused(tmp_path, monkeypatch):
    def boom(out, **k):
        (out / "questions").mkdir(parents=True)
        (out / "questions" / "CLEVR_train_questions.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(default_mod, "generate_dataset", boom)
    with pytest.raises(KeyboardInterrupt):
        data.default_dataset(tmp_path, n_train=3, n_val=2, image_size=24)
    assert list(tmp_path.iterdir()) == []  # neither a final folder nor a leftover temporary one


def test_cli(tmp_path, capsys):
    assert cli.main(["--out", str(tmp_path / "o"), "--train", "2", "--val", "1", "--image-size", "24",
                     "--questions-per-image", "2", "--seed", "5", "--no-progress"]) == 0
    qs = _load(tmp_path / "o", "questions", "train")["questions"]
    assert len(qs) == 4 and "wrote" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path / "p"), "--train", "-3"])


def test_no_object_is_hidden():
    """Removing any object from a crowded scene changes at least 80% of the pixels that
    object covers when drawn alone: depth order never hides one (mostly) behind another."""
    import random

    import numpy as np

    from fastmod.data.scene import compute_relationships, sample_scene

    def draw(objs):
        return np.asarray(data.render_scene({"objects": objs}, 64), dtype=np.int16)

    rng = random.Random(0)
    empty = draw([])
    for _ in range(6):
        objs = sample_scene(rng, 64, num_objects=10)["objects"]
        full = draw(objs)
        for i in range(len(objs)):
            alone = (np.abs(draw([objs[i]]) - empty).sum(-1) > 30)
            without = draw(objs[:i] + objs[i + 1:])
            visible = (np.abs(full - without).sum(-1) > 30) & alone
            assert alone.sum() > 10 and visible.sum() >= 0.8 * alone.sum(), (i, objs[i], visible.sum(), alone.sum())
    assert compute_relationships(objs)  # the sampled scenes are valid scenes
