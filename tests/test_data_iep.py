"""clevr-iep's preprocessed HDF5 pair (questions.h5 + features.h5 + vocab.json)."""
import json

import h5py
import numpy as np
import pytest
import torch

from fastmod import data
from fastmod.data import DataError, MissingDataError

SPECIALS = ["<NULL>", "<START>", "<END>", "<UNK>"]
# clevr-iep's build_vocab puts the specials first in every vocabulary, answers included
Q_VOCAB = {t: i for i, t in enumerate(SPECIALS + ["how", "many", "red", "cubes", "are", "there", "is", "a", "What"])}
A_VOCAB = {t: i for i, t in enumerate(SPECIALS + ["0", "1", "2", "no", "yes", "red"])}
P_VOCAB = {t: i for i, t in enumerate(SPECIALS + ["count", "exist", "filter_color[red]", "filter_shape[cube]",
                                                  "scene", "unique", "query_color"])}


def encode(words, vocab, length):
    ids = [vocab["<START>"]] + [vocab[w] for w in words] + [vocab["<END>"]]
    return ids + [0] * (length - len(ids))


@pytest.fixture
def iep(tmp_path):
    qs = [encode("how many red cubes are there".split(), Q_VOCAB, 10),
          encode("is there a red cube".replace("cube", "cubes").split(), Q_VOCAB, 10),
          encode("how many cubes".split(), Q_VOCAB, 10)]
    # prefix order, as clevr-iep's preprocess_questions.py writes by default
    progs = [encode(["count", "filter_shape[cube]", "filter_color[red]", "scene"], P_VOCAB, 8),
             encode(["exist", "filter_shape[cube]", "filter_color[red]", "scene"], P_VOCAB, 8),
             encode(["count", "filter_shape[cube]", "scene"], P_VOCAB, 8)]
    with h5py.File(tmp_path / "val_questions.h5", "w") as f:
        f["questions"] = np.asarray(qs, dtype=np.int64)
        f["image_idxs"] = np.asarray([1, 0, 1], dtype=np.int64)
        f["orig_idxs"] = np.arange(3)
        f["programs"] = np.asarray(progs, dtype=np.int64)
        f["answers"] = np.asarray([A_VOCAB["2"], A_VOCAB["yes"], A_VOCAB["0"]], dtype=np.int64)
    feats = np.random.default_rng(0).standard_normal((2, 16, 14, 14)).astype(np.float32)
    with h5py.File(tmp_path / "val_features.h5", "w") as f:
        f["features"] = feats
    (tmp_path / "vocab.json").write_text(json.dumps(
        {"question_token_to_idx": Q_VOCAB, "answer_token_to_idx": A_VOCAB, "program_token_to_idx": P_VOCAB}))
    return tmp_path, feats


def test_reads_iep_pair(iep):
    root, feats = iep
    ds = data.IepDataset(root / "val_questions.h5", root / "val_features.h5", root / "vocab.json")
    assert len(ds) == 3 and ds.has_answers
    it = ds[0]
    assert it["question"].tolist() == encode("how many red cubes are there".split(), Q_VOCAB, 8)
    assert int(it["answer"]) == A_VOCAB["2"] and ds.vocab.decode_answer(int(it["answer"])) == "2"
    assert (it["qtype"], it["qsubtype"]) == ("count", "count")
    assert (ds[1]["qtype"], ds[1]["qsubtype"]) == ("exist", "exist")
    assert torch.equal(it["features"], torch.from_numpy(feats[1]))
    assert torch.equal(ds[1]["features"], torch.from_numpy(feats[0]))
    batch = data.collate([ds[i] for i in range(3)])
    assert batch["question"].shape == (3, 8) and batch["question_len"].tolist() == [8, 7, 5]
    assert batch["features"].shape == (3, 16, 14, 14)
    assert batch["answer"].tolist() == [A_VOCAB["2"], A_VOCAB["yes"], A_VOCAB["0"]]
    assert ds.vocab.num_answers == len(A_VOCAB)
    # the same vocab.json serves to encode new questions
    assert ds.vocab.encode_question("How many red cubes?") == [1, 4, 5, 6, 7, 2]
    assert ds.vocab.encode_question("What is red?") == [1, 12, 10, 6, 2]  # clevr-iep keeps the case


def test_postfix_programs_and_missing_answers(iep, tmp_path):
    root, _ = iep
    with h5py.File(root / "val_questions.h5", "a") as f:
        progs = f["programs"][()]
        del f["programs"], f["answers"]
        f["programs"] = np.asarray([encode(["scene", "filter_color[red]", "unique", "query_color"], P_VOCAB, 8)]
                                   + list(progs[1:]))
    ds = data.IepDataset(root / "val_questions.h5", root / "val_features.h5", root / "vocab.json")
    assert (ds[0]["qtype"], ds[0]["qsubtype"]) == ("query_attribute", "query_color")
    assert not ds.has_answers and int(ds[0]["answer"]) == -1


def test_iep_bad_inputs(iep):
    root, _ = iep
    with pytest.raises(MissingDataError, match="nope.h5 does not exist"):
        data.IepDataset(root / "nope.h5", root / "val_features.h5", root / "vocab.json")
    with pytest.raises(FileNotFoundError, match="vocab2.json"):
        data.IepDataset(root / "val_questions.h5", root / "val_features.h5", root / "vocab2.json")
    (root / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match=r"bad\.h5 is not a readable HDF5 file"):
        data.IepDataset(root / "bad.h5", root / "val_features.h5", root / "vocab.json")
    with h5py.File(root / "few.h5", "w") as f:
        f["features"] = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(DataError, match=r"few\.h5.*image index 1 is out of range"):
        data.IepDataset(root / "val_questions.h5", root / "few.h5", root / "vocab.json")
    with h5py.File(root / "val_questions.h5", "a") as f:
        f["questions"][2, 3] = 500
    with pytest.raises(DataError, match=r"val_questions\.h5: question record 2 has a token id outside"):
        data.IepDataset(root / "val_questions.h5", root / "val_features.h5", root / "vocab.json")
    with h5py.File(root / "val_questions.h5", "a") as f:
        f["questions"][2, 3] = 4
        f["answers"][1] = 99
    with pytest.raises(DataError, match=r"val_questions\.h5: record 1 has answer index 99"):
        data.IepDataset(root / "val_questions.h5", root / "val_features.h5", root / "vocab.json")
    with h5py.File(root / "val_questions.h5", "a") as f:
        del f["image_idxs"]
    with pytest.raises(DataError, match=r"val_questions\.h5 has no dataset 'image_idxs'"):
        data.IepDataset(root / "val_questions.h5", root / "val_features.h5", root / "vocab.json")
    (root / "v.json").write_text(json.dumps({"question_token_to_idx": Q_VOCAB}))
    with pytest.raises(ValueError, match=r"v\.json lacks key\(s\) \['answer_token_to_idx'\]"):
        data.IepDataset(root / "val_questions.h5", root / "val_features.h5", root / "v.json")
