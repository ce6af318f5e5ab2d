"""A small fixture in the real CLEVR_v1.0 layout (written here, following the released
files' conventions), read through ClevrDataset; and every bad-input case."""
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from fastmod import data
from fastmod.data import DataError, MissingDataError

# Records copied in form from CLEVR_v1.0 (val split): keys in the released order, 480x320 PNGs,
# 'function' programs; the second question uses the older 'type'/'side_inputs' spelling.
QUESTIONS = [
    {"image_index": 0, "program": [
        {"inputs": [], "function": "scene", "value_inputs": []},
        {"inputs": [0], "function": "filter_size", "value_inputs": ["large"]},
        {"inputs": [1], "function": "filter_color", "value_inputs": ["green"]},
        {"inputs": [2], "function": "count", "value_inputs": []},
        {"inputs": [], "function": "scene", "value_inputs": []},
        {"inputs": [4], "function": "filter_size", "value_inputs": ["large"]},
        {"inputs": [5], "function": "filter_color", "value_inputs": ["purple"]},
        {"inputs": [6], "function": "filter_material", "value_inputs": ["metal"]},
        {"inputs": [7], "function": "filter_shape", "value_inputs": ["cube"]},
        {"inputs": [8], "function": "count", "value_inputs": []},
        {"inputs": [3, 9], "function": "greater_than", "value_inputs": []}],
     "question_index": 0, "image_filename": "CLEVR_val_000000.png", "question_family_index": 2, "split": "val",
     "answer": "yes", "question": "Are there more big green things than large purple shiny cubes?"},
    {"image_index": 0, "program": [
        {"inputs": [], "type": "scene", "side_inputs": []},
        {"inputs": [0], "type": "filter_color", "side_inputs": ["brown"]},
        {"inputs": [1], "type": "unique", "side_inputs": []},
        {"inputs": [2], "type": "query_shape", "side_inputs": []}],
     "question_index": 1, "image_filename": "CLEVR_val_000000.png", "question_family_index": 26, "split": "val",
     "answer": "cylinder", "question": "What shape is the brown thing?"},
    {"image_index": 1, "program": [
        {"inputs": [], "function": "scene", "value_inputs": []},
        {"inputs": [0], "function": "filter_color", "value_inputs": ["gray"]},
        {"inputs": [1], "function": "exist", "value_inputs": []}],
     "question_index": 2, "image_filename": "CLEVR_val_000001.png", "question_family_index": 40, "split": "val",
     "answer": "yes", "question": "Is there a gray object?"},
]
TEST_QUESTIONS = [  # the released test split: no answer, program or family
    {"image_index": 0, "split": "test", "image_filename": "CLEVR_test_000000.png", "question_index": 0,
     "question": "How many rubber things are there?"},
    {"image_index": 0, "split": "test", "image_filename": "CLEVR_test_000000.png", "question_index": 1,
     "question": "Is the big cylinder the same colour as the zorblax?"}]


def _scene(i, split, objs):
    objects = [{"color": c, "size": s, "rotation": 178.9, "shape": sh, "3d_coords": [x, y, 0.7],
                "material": m, "pixel_coords": [int(240 + 40 * x), int(160 - 30 * y), 10.0]}
               for c, s, sh, m, x, y in objs]
    from fastmod.data.scene import compute_relationships
    return {"split": split, "image_index": i, "image_filename": f"CLEVR_{split}_{i:06d}.png",
            "directions": {"right": [0.65, 0.75, 0.0], "behind": [-0.75, 0.65, 0.0], "above": [0, 0, 1],
                           "below": [0, 0, -1], "left": [-0.65, -0.75, -0.0], "front": [0.75, -0.65, -0.0]},
            "objects": objects, "relationships": compute_relationships(objects)}


SCENES = [_scene(0, "val", [("brown", "large", "cylinder", "rubber", -1.5, -1.7),
                            ("green", "large", "sphere", "metal", 1.0, 2.0)]),
          _scene(1, "val", [("gray", "small", "cube", "rubber", 0.0, 0.0)])]
INFO = {"split": "val", "license": "Creative Commons Attribution (CC BY 4.0)", "version": "1.0", "date": "2/14/2017"}


def write_clevr(root, questions=QUESTIONS, scenes=SCENES, test=TEST_QUESTIONS):
    """Write the fixture; returns root."""
    (root / "questions").mkdir(parents=True)
    (root / "scenes").mkdir()
    (root / "questions" / "CLEVR_val_questions.json").write_text(json.dumps({"info": INFO, "questions": questions}))
    (root / "questions" / "CLEVR_test_questions.json").write_text(
        json.dumps({"info": {**INFO, "split": "test"}, "questions": test}))
    (root / "scenes" / "CLEVR_val_scenes.json").write_text(json.dumps({"info": INFO, "scenes": scenes}))
    rng = np.random.default_rng(0)
    for split, n in (("val", 2), ("test", 1)):
        (root / "images" / split).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 255, (320, 480, 4), dtype=np.uint8)  # CLEVR's PNGs are 480x320 RGBA
            Image.fromarray(arr, "RGBA").save(root / "images" / split / f"CLEVR_{split}_{i:06d}.png")
    return root


@pytest.fixture
def clevr(tmp_path):
    return write_clevr(tmp_path / "CLEVR_v1.0")


@pytest.fixture
def vocab():
    return data.Vocab.build(QUESTIONS)


def test_reads_real_layout(clevr, vocab):
    ds = data.ClevrDataset(clevr, "val", vocab, image_size=64)
    assert len(ds) == 3
    items = [ds[i] for i in range(3)]
    assert [vocab.decode_answer(int(it["answer"])) for it in items] == ["yes", "cylinder", "yes"]
    assert [(it["qtype"], it["qsubtype"]) for it in items] == [
        ("compare_number", "greater_than"), ("query_attribute", "query_shape"), ("exist", "exist")]
    assert [it["index"] for it in items] == [0, 1, 2]
    q = items[0]["question"]
    assert q.dtype == torch.long and int(q[0]) == vocab.question_token_to_idx["<START>"]
    assert vocab.decode_question(q) == "are there more big green things than large purple shiny cubes"
    img = items[0]["image"]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32
    # ImageNet normalisation of the resized RGB image
    raw = np.asarray(Image.open(clevr / "images/val/CLEVR_val_000000.png").convert("RGB")
                     .resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255
    mean, std = np.array(data.IMAGENET_MEAN), np.array(data.IMAGENET_STD)
    torch.testing.assert_close(img, torch.from_numpy(((raw - mean) / std).transpose(2, 0, 1)).float())
    assert data.ClevrDataset(clevr, "val", vocab, image_size=224)[2]["image"].shape == (3, 224, 224)
    assert len(data.ClevrDataset(clevr, "val", vocab, max_questions=2)) == 2


def test_test_split_without_answers(clevr, vocab):
    ds = data.ClevrDataset(clevr, "test", vocab, image_size=32)
    assert not ds.has_answers
    assert [int(ds[i]["answer"]) for i in range(2)] == [-1, -1]
    assert ds.qtypes == ["count", "unknown"]
    unk = vocab.question_token_to_idx["<UNK>"]
    assert unk in ds[1]["question"].tolist()  # 'colour', 'zorblax' are not in the vocabulary


def test_scenes_reader_and_executor_agree(clevr):
    scenes = data.read_scenes(clevr, "val")
    for q in data.read_questions(clevr, "val"):
        assert data.execute(q["program"], scenes[q["image_index"]]) == q["answer"]
    assert data.read_scenes(clevr, "test") is None


def test_features_h5_instead_of_images(clevr, vocab, tmp_path):
    feats = np.random.default_rng(1).standard_normal((2, 8, 3, 3)).astype(np.float32)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["features"] = feats
    ds = data.ClevrDataset(clevr, "val", vocab, features_h5=tmp_path / "f.h5")
    it = ds[2]
    assert "image" not in it and torch.equal(it["features"], torch.from_numpy(feats[1]))
    batch = data.collate([ds[0], ds[2]])
    assert batch["features"].shape == (2, 8, 3, 3)


def test_image_cache_built_once_and_used(clevr, vocab, tmp_path, monkeypatch):
    plain = data.ClevrDataset(clevr, "val", vocab, image_size=32)
    want = [plain[i]["image"] for i in range(3)]
    cache = tmp_path / "c" / "imgs.h5"
    cached = data.ClevrDataset(clevr, "val", vocab, image_size=32, image_cache=cache)
    assert cache.is_file()
    for i in range(3):
        torch.testing.assert_close(cached[i]["image"], want[i])
    # a second dataset reuses the file and reads no PNG
    from fastmod.data import cache as cache_mod

    def no_png(*a, **k):
        raise AssertionError("PNG decoded although the cache exists")

    monkeypatch.setattr(cache_mod, "load_image", no_png)
    again = data.ClevrDataset(clevr, "val", vocab, image_size=32, image_cache=cache)
    torch.testing.assert_close(again[1]["image"], want[1])
    # a cache for another image size is stale: it is rebuilt (which needs the PNGs)
    with pytest.raises(AssertionError, match="PNG decoded"):
        data.ClevrDataset(clevr, "val", vocab, image_size=16, image_cache=cache)
    monkeypatch.undo()
    assert data.ClevrDataset(clevr, "val", vocab, image_size=16, image_cache=cache)[0]["image"].shape == (3, 16, 16)
    default = data.ClevrDataset(clevr, "val", vocab, image_size=32, image_cache=True)
    assert (clevr / "cache" / "images_val_32.h5").is_file() and len(default) == 3


def test_dataset_pickles_for_workers(clevr, vocab, tmp_path):
    import pickle
    ds = data.ClevrDataset(clevr, "val", vocab, image_size=16, image_cache=tmp_path / "c.h5")
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[1]["image"], ds[1]["image"])


# ------------------------------------------------------------------ bad input
def _rewrite_questions(root, questions):
    (root / "questions" / "CLEVR_val_questions.json").write_text(json.dumps({"info": INFO, "questions": questions}))


def test_bad_arguments(clevr, vocab):
    with pytest.raises(TypeError, match="split"):
        data.ClevrDataset(clevr, None, vocab)
    with pytest.raises(TypeError, match="vocab"):
        data.ClevrDataset(clevr, "val", {"a": 1})
    with pytest.raises(ValueError, match="image_size"):
        data.ClevrDataset(clevr, "val", vocab, image_size=0)
    with pytest.raises(ValueError, match="max_questions"):
        data.ClevrDataset(clevr, "val", vocab, max_questions=0)
    with pytest.raises(ValueError, match="check_images"):
        data.ClevrDataset(clevr, "val", vocab, check_images="some")


def test_missing_folder(tmp_path, vocab):
    with pytest.raises(MissingDataError, match="does not exist") as e:
        data.ClevrDataset(tmp_path / "nope", "val", vocab)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)


def test_missing_questions_file(clevr, vocab):
    with pytest.raises(MissingDataError, match="CLEVR_train_questions.json"):
        data.ClevrDataset(clevr, "train", vocab)


def test_missing_image_folder(clevr, vocab):
    shutil.rmtree(clevr / "images" / "val")
    with pytest.raises(MissingDataError, match=r"images/val"):
        data.ClevrDataset(clevr, "val", vocab)


def test_missing_image_file_names_file_and_record(clevr, vocab):
    (clevr / "images" / "val" / "CLEVR_val_000001.png").unlink()
    with pytest.raises(MissingDataError, match=r"CLEVR_val_000001\.png.*question record 2"):
        data.ClevrDataset(clevr, "val", vocab)


def test_image_index_out_of_range(clevr, vocab):
    qs = json.loads(json.dumps(QUESTIONS))
    qs[1]["image_index"], qs[1]["image_filename"] = 7, "CLEVR_val_000007.png"
    _rewrite_questions(clevr, qs)
    with pytest.raises(DataError, match=r"CLEVR_val_questions\.json: question record 1 has image_index 7.*2 scenes"):
        data.ClevrDataset(clevr, "val", vocab)
    (clevr / "scenes" / "CLEVR_val_scenes.json").unlink()  # without scenes: the image file is missing
    with pytest.raises(MissingDataError, match=r"CLEVR_val_000007\.png.*question record 1"):
        data.ClevrDataset(clevr, "val", vocab)


def test_image_index_out_of_range_for_features(clevr, vocab, tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["features"] = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(DataError, match=r"f\.h5.*image index 1 is out of range"):
        data.ClevrDataset(clevr, "val", vocab, features_h5=tmp_path / "f.h5")
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f["feats"] = np.zeros((2, 4, 2, 2), np.float32)
    with pytest.raises(DataError, match=r"g\.h5 has no dataset 'features'"):
        data.ClevrDataset(clevr, "val", vocab, features_h5=tmp_path / "g.h5")


def test_corrupt_png_detected_up_front(clevr, vocab):
    (clevr / "images" / "val" / "CLEVR_val_000000.png").write_bytes(b"this is not a png at all")
    with pytest.raises(DataError, match=r"CLEVR_val_000000\.png.*question record 0.*not a PNG"):
        data.ClevrDataset(clevr, "val", vocab)


def test_truncated_png(clevr, vocab, tmp_path):
    path = clevr / "images" / "val" / "CLEVR_val_000001.png"
    path.write_bytes(path.read_bytes()[:200])  # valid signature, truncated data
    ds = data.ClevrDataset(clevr, "val", vocab)  # the header check passes ...
    with pytest.raises(DataError, match=r"CLEVR_val_000001\.png.*cannot be decoded"):
        ds[2]  # ... decoding names the file
    with pytest.raises(DataError, match=r"CLEVR_val_000001\.png.*cannot be decoded"):
        data.ClevrDataset(clevr, "val", vocab, check_images="full")
    with pytest.raises(DataError, match=r"CLEVR_val_000001\.png"):
        data.ClevrDataset(clevr, "val", vocab, image_cache=tmp_path / "c.h5")
    assert not (tmp_path / "c.h5").exists()  # no half-written cache left behind


def test_invalid_json(clevr, vocab):
    (clevr / "questions" / "CLEVR_val_questions.json").write_text('{"questions": [')
    with pytest.raises(DataError, match=r"CLEVR_val_questions\.json is not valid JSON"):
        data.ClevrDataset(clevr, "val", vocab)
    (clevr / "questions" / "CLEVR_val_questions.json").write_text('{"info": {}}')
    with pytest.raises(DataError, match=r"CLEVR_val_questions\.json: expected an object with a 'questions' list"):
        data.ClevrDataset(clevr, "val", vocab)


@pytest.mark.parametrize("key", ["question", "image_index", "answer"])
def test_json_missing_keys_name_record(clevr, vocab, key):
    qs = json.loads(json.dumps(QUESTIONS))
    del qs[2][key]
    _rewrite_questions(clevr, qs)
    with pytest.raises(DataError, match=rf"CLEVR_val_questions\.json: question record 2 lacks key '{key}'"):
        data.ClevrDataset(clevr, "val", vocab)


def test_json_bad_values(clevr, vocab):
    qs = json.loads(json.dumps(QUESTIONS))
    qs[1]["image_index"] = "0"
    _rewrite_questions(clevr, qs)
    with pytest.raises(DataError, match=r"question record 1 has image_index='0', expected int"):
        data.ClevrDataset(clevr, "val", vocab)
    qs[1]["image_index"], qs[1]["program"] = 0, [{"inputs": []}]
    _rewrite_questions(clevr, qs)
    with pytest.raises(DataError, match=r"question record 1 has a malformed program"):
        data.ClevrDataset(clevr, "val", vocab)


def test_scene_missing_keys(clevr, vocab):
    scenes = json.loads(json.dumps(SCENES))
    del scenes[1]["objects"][0]["material"]
    (clevr / "scenes" / "CLEVR_val_scenes.json").write_text(json.dumps({"info": INFO, "scenes": scenes}))
    with pytest.raises(DataError,
                       match=r"CLEVR_val_scenes\.json: scene record 1, object 0 lacks key\(s\) \['material'\]"):
        data.ClevrDataset(clevr, "val", vocab)


def test_unknown_answer_names_record(clevr):
    vocab = data.Vocab.build(QUESTIONS)
    qs = json.loads(json.dumps(QUESTIONS))
    qs[2]["answer"] = "maybe"
    _rewrite_questions(clevr, qs)
    with pytest.raises(DataError, match=r"CLEVR_val_questions\.json: question record 2: answer 'maybe'"):
        data.ClevrDataset(clevr, "val", vocab)
