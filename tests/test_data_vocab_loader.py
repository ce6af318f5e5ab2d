"""Tokeniser, vocabularies (build/save/load/reuse), collate and make_loader."""
import json
import os
import warnings

import pytest
import torch

from fastmod import data
from fastmod.data import Vocab, collate, load_or_build_vocab, make_loader, tokenize

QS = [{"question": "How many red cubes are there?", "answer": "2",
       "program": [{"function": "scene", "inputs": [], "value_inputs": []},
                   {"function": "filter_color", "inputs": [0], "value_inputs": ["red"]},
                   {"function": "count", "inputs": [1], "value_inputs": []}]},
      {"question": "Is the sphere left of the cube; or not, really?", "answer": "yes"}]


def test_tokenize_like_clevr_iep():
    assert tokenize("How many red cubes are there?") == ["how", "many", "red", "cubes", "are", "there"]
    assert tokenize("A; b, c.") == ["a", ";", "b", ",", "c"]
    with pytest.raises(TypeError, match="question must be a str"):
        tokenize(3)


def test_build_encode_decode():
    v = Vocab.build(QS)
    for d in (v.question_token_to_idx, v.program_token_to_idx):
        assert [d[s] for s in ("<NULL>", "<START>", "<END>", "<UNK>")] == [0, 1, 2, 3]
    assert v.num_answers == 28 and v.encode_answer("2") == v.answer_token_to_idx["2"]
    ids = v.encode_question("How many shiny cubes?")
    assert ids[0] == 1 and ids[-1] == 2 and ids[3] == v.question_token_to_idx["<UNK>"]
    assert v.decode_question(ids) == "how many <UNK> cubes"
    with pytest.raises(ValueError, match="answer 'maybe' is not in the answer vocabulary"):
        v.encode_answer("maybe")
    assert v.encode_answer("maybe", allow_unknown=True) == -1
    assert v.decode_answer(v.encode_answer("cyan")) == "cyan"
    prog = v.encode_program(QS[0]["program"])
    assert [v.program_idx_to_token[i] for i in prog] == ["<START>", "scene", "filter_color[red]", "count", "<END>"]
    assert v.num_question_tokens == len(v.question_token_to_idx)
    assert Vocab.build(reversed(QS)) == v  # order-independent
    assert Vocab.build(["just strings work too"]).encode_question("strings")[1] != 3


def test_save_load_round_trip(tmp_path):
    v = Vocab.build(QS)
    v.save(tmp_path / "v.json")
    assert Vocab.load(tmp_path / "v.json") == v
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Vocab.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        Vocab.load(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text(json.dumps({**v.to_dict(), "question_token_to_idx": {"a": 0}}))
    with pytest.raises(ValueError, match=r"bad2\.json.*<NULL>=0"):
        Vocab.load(tmp_path / "bad2.json")


def test_load_or_build_saves_beside_data_and_reuses(tmp_path):
    v = load_or_build_vocab(tmp_path, QS)
    assert (tmp_path / "vocab.json").is_file()
    assert load_or_build_vocab(tmp_path, [{"question": "other words entirely", "answer": "no"}]) == v
    assert load_or_build_vocab(tmp_path) == v
    with pytest.raises(FileNotFoundError, match="no vocabulary"):
        load_or_build_vocab(tmp_path / "empty")
    w = load_or_build_vocab(tmp_path / "ro", QS[:1], vocab_path=tmp_path / "elsewhere" / "v.json")
    assert (tmp_path / "elsewhere" / "v.json").is_file() and not (tmp_path / "ro" / "vocab.json").exists()
    assert load_or_build_vocab(tmp_path / "ro", None, vocab_path=tmp_path / "elsewhere" / "v.json") == w


def test_read_only_data_dir_falls_back_to_cache(tmp_path, monkeypatch):
    data_dir = tmp_path / "readonly"
    data_dir.mkdir()
    monkeypatch.setenv("FASTMOD_CACHE", str(tmp_path / "cache"))
    real_save = Vocab.save

    def save(self, path):
        if str(path).startswith(str(data_dir)):
            raise PermissionError(13, "Permission denied")
        return real_save(self, path)

    monkeypatch.setattr(Vocab, "save", save)
    with pytest.warns(UserWarning, match="not writable"):
        v = load_or_build_vocab(data_dir, QS)
    assert list((tmp_path / "cache" / "vocab").glob("readonly-*.json"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_or_build_vocab(data_dir, None) == v  # found in the cache next time


def _item(n_tokens, answer, i, key="image"):
    return {"question": torch.arange(1, n_tokens + 1), "answer": torch.tensor(answer), "qtype": "count",
            "qsubtype": "count", "index": i, key: torch.full((3, 4, 4), float(i))}


def test_collate_pads_with_null():
    b = collate([_item(3, 5, 0), _item(5, -1, 7)])
    assert b["question"].tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]]
    assert b["question"].dtype == torch.long and b["question_len"].tolist() == [3, 5]
    assert b["answer"].tolist() == [5, -1] and b["index"].tolist() == [0, 7]
    assert b["image"].shape == (2, 3, 4, 4) and float(b["image"][1, 0, 0, 0]) == 7.0
    assert b["qtype"] == ["count", "count"] and b["qsubtype"] == ["count", "count"]
    assert "features" in collate([_item(2, 0, 0, "features")])
    with pytest.raises(ValueError, match="batch must not be empty"):
        collate([])


class _Toy(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, i):
        return _item(1 + i % 4, i, i)


def test_make_loader_is_reproducible():
    def order(seed):
        return torch.cat([b["index"] for b in make_loader(_Toy(), 6, shuffle=True, seed=seed)]).tolist()

    assert order(0) == order(0) and sorted(order(0)) == list(range(20))
    assert order(0) != order(1)
    plain = [b["index"].tolist() for b in make_loader(_Toy(), 6, shuffle=False)]
    assert plain[0] == [0, 1, 2, 3, 4, 5] and len(plain) == 4
    assert len(list(make_loader(_Toy(), 6, shuffle=False, drop_last=True))) == 3
    sampler = torch.utils.data.SubsetRandomSampler([1, 3], generator=torch.Generator().manual_seed(0))
    picked = torch.cat([b["index"] for b in make_loader(_Toy(), 6, shuffle=False, sampler=sampler)])
    assert sorted(picked.tolist()) == [1, 3]
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(_Toy(), 0, shuffle=True)
    with pytest.raises(ValueError, match="sampler"):
        make_loader(_Toy(), 2, shuffle=True, sampler=sampler)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="worker test uses fork")
def test_loader_workers_with_hdf5_cache(tmp_path):
    root = data.generate_dataset(tmp_path / "d", n_train=4, n_val=0, image_size=16, questions_per_image=2,
                                 workers=1, progress=False)
    vocab = load_or_build_vocab(root, data.read_questions(root, "train"))
    ds = data.ClevrDataset(root, "train", vocab, image_size=16, image_cache=True)
    ref = torch.stack([ds[i]["image"] for i in range(len(ds))])
    loader = make_loader(ds, 3, shuffle=False, num_workers=1)
    got = torch.cat([b["image"] for b in loader])
    torch.testing.assert_close(got, ref)
