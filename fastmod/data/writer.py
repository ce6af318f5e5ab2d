"""Generate a CLEVR-style dataset in the CLEVR_v1.0 layout.

    out/images/{split}/CLEVR_{split}_{i:06d}.png
    out/questions/CLEVR_{split}_questions.json
    out/scenes/CLEVR_{split}_scenes.json        (train/val; like CLEVR, none for test)

Work is cut into fixed chunks of images; each chunk has its own random stream
(seeded by seed, split, chunk number) and its own answer-balancing counters, so
the output depends only on the seed, never on the number of worker processes.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from fastmod.data.executor import IllPosedProgram, execute
from fastmod.data.render import render_scene
from fastmod.data.scene import sample_scene
from fastmod.data.templates import TEMPLATES, Ctx

GENERATOR_VERSION = 2  # bump when the output for a given seed changes (names default_dataset folders)
CHUNK = 50            # images per work unit
ATTEMPTS = 12         # samples tried per template per question
LICENSE = "Creative Commons Attribution (CC BY 4.0)"


def image_filename(split: str, index: int) -> str:
    return f"CLEVR_{split}_{index:06d}.png"


def _draw(ctx: Ctx, k: int, counts: Counter, seen: set, scene: dict):
    """One well-posed, not yet asked question from template ``k``, or None.

    Balancing: sample up to ``ATTEMPTS`` candidates and keep the one whose answer
    has been given least often for this template (in this chunk), stopping early
    at an answer given no more often than the mean over the answers this template
    has produced so far (so over-represented answers are only taken when nothing
    else turns up)."""
    best, best_count = None, None
    floor = sum(counts.values()) / len(counts) if counts else 0.0
    for _ in range(ATTEMPTS):
        r = TEMPLATES[k].sample(ctx)
        if r is None or r[0] in seen:
            continue
        try:
            answer = execute(r[1], scene)
        except IllPosedProgram:
            continue
        counts[answer] += 0  # an answer this template can give: part of its domain
        if best is None or counts[answer] < best_count or (counts[answer] == best_count and ctx.rng.random() < 0.5):
            best, best_count = (r[0], r[1], answer), counts[answer]
        if best_count <= floor:
            break
    return best


def _ask(rng: random.Random, scene: dict, n_questions: int, counts, with_answers=True):
    """``n_questions`` distinct questions about ``scene``, cycling through the templates
    in a random order (skipping those that cannot be asked about this scene)."""
    ctx = Ctx(scene, rng)
    order = list(range(len(TEMPLATES)))
    rng.shuffle(order)
    pos, seen, out = 0, set(), []
    for _ in range(n_questions):
        for _try in range(len(TEMPLATES)):
            k = order[pos % len(order)]
            pos += 1
            got = _draw(ctx, k, counts[k], seen, scene)
            if got is not None:
                break
        else:
            break  # no template yields a new question on this scene
        text, program, answer = got
        counts[k][answer] += 1
        seen.add(text)
        q = {"image_index": scene["image_index"], "image_filename": scene["image_filename"],
             "split": scene["split"], "question": text}
        if with_answers:
            q.update(answer=answer, question_family_index=k, program=program, family=TEMPLATES[k].family)
        out.append(q)
    return out


def _chunk(job):
    out_dir, split, start, stop, seed, image_size, qpi = job
    ss = np.random.SeedSequence([seed, zlib.crc32(split.encode()), start // CHUNK])
    rng = random.Random(int(ss.generate_state(2, np.uint64)[0]))
    counts: dict[int, Counter] = defaultdict(Counter)
    scenes, questions = [], []
    img_dir = Path(out_dir) / "images" / split
    for i in range(start, stop):
        objs = sample_scene(rng, image_size)
        scene = {"split": split, "image_index": i, "image_filename": image_filename(split, i), **objs}
        render_scene(scene, image_size).save(img_dir / scene["image_filename"], compress_level=1)
        questions += _ask(rng, scene, qpi, counts, with_answers=(split != "test"))
        scenes.append(scene)
    # JSON text travels back to the parent far cheaper than nested dicts (pickling)
    return [_json(x) for x in scenes], [_json(q) for q in questions]


def _json(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _write(path: Path, info: dict, key: str, items: list[str]) -> None:
    """``{"info": info, key: [items]}`` from items already JSON-encoded; atomically."""
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        f.write(f'{{"info":{_json(info)},"{key}":[')
        f.write(",".join(items))
        f.write("]}")
    os.replace(tmp, path)


def generate_dataset(out_dir, n_train: int = 10000, n_val: int = 1000, *, n_test: int = 0, seed: int = 0,
                     image_size: int = 128, questions_per_image: int = 10, workers: int | None = None,
                     progress: bool = True) -> Path:
    """Write a CLEVR-style dataset to ``out_dir`` (created) and return its path.

    ``n_train``/``n_val``/``n_test`` images (test questions carry no answer or
    program, and test has no scenes file, as in CLEVR), ``questions_per_image``
    questions each, square ``image_size`` PNGs.  Deterministic given ``seed``;
    ``workers`` processes (default: up to 2).
    """
    for name, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
    if not isinstance(questions_per_image, int) or questions_per_image < 1:
        raise ValueError(f"questions_per_image must be a positive int, got {questions_per_image!r}")
    out = Path(out_dir)
    splits = [(s, n) for s, n in (("train", n_train), ("val", n_val), ("test", n_test)) if n > 0]
    for s, _ in splits:
        (out / "images" / s).mkdir(parents=True, exist_ok=True)
    (out / "questions").mkdir(parents=True, exist_ok=True)
    (out / "scenes").mkdir(parents=True, exist_ok=True)

    jobs = [(str(out), s, a, min(a + CHUNK, n), seed, image_size, questions_per_image)
            for s, n in splits for a in range(0, n, CHUNK)]
    workers = min(workers or min(2, os.cpu_count() or 1), max(1, len(jobs)))
    if mp.current_process().daemon:  # e.g. inside a DataLoader worker: daemons cannot have children
        workers = 1
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(n for _, n in splits), desc="generating CLEVR-style data", unit="img")
    results: dict[str, tuple[list, list]] = {s: ([], []) for s, _ in splits}
    pool = None
    try:
        if workers > 1:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(workers)
            it = pool.imap(_chunk, jobs)
        else:
            it = map(_chunk, jobs)
        for job, (scenes, questions) in zip(jobs, it):
            results[job[1]][0].extend(scenes)
            results[job[1]][1].extend(questions)
            if bar is not None:
                bar.update(job[3] - job[2])
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()

    for s, _ in splits:
        scenes, questions = results[s]
        # question_index is global to the split: prepend it to each encoded record
        questions = [f'{{"question_index":{qi},{q[1:]}' for qi, q in enumerate(questions)]
        info = {"split": s, "license": LICENSE, "version": "1.0",
                "generator": f"fastmod.data.generate v{GENERATOR_VERSION}", "seed": seed,
                "image_size": image_size}
        _write(out / "questions" / f"CLEVR_{s}_questions.json", info, "questions", questions)
        if s != "test":
            _write(out / "scenes" / f"CLEVR_{s}_scenes.json", info, "scenes", scenes)
    return out
