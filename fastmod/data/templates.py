"""CLEVR-style question templates.

Each template samples its parameters *from the scene* (referring expressions that
pick out one object, filters that usually match something), builds the question
text and its CLEVR program; the answer always comes from running the program
through :func:`fastmod.data.executor.execute`, which also rejects ill-posed ones.

``TEMPLATES[k]`` is the template with ``question_family_index == k``; its
``family`` is one of CLEVR's families: zero_hop, one_hop, two_hop, three_hop,
single_and, single_or, same_relate, compare_integer, comparison.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import random

from fastmod.data.scene import ATTRIBUTES, RELATIONS, VALUES

NOUN = {"cube": ("cube", "block"), "sphere": ("sphere", "ball"), "cylinder": ("cylinder",),
        None: ("thing", "object")}
REL_TEXT = {"left": "left of", "right": "right of", "front": "in front of", "behind": "behind"}
_SUBSETS = {k: [frozenset(c) for c in itertools.combinations(ATTRIBUTES, k)] for k in range(5)}


class Program:
    """Builds a CLEVR program node by node; ``add`` returns the node index."""

    def __init__(self):
        self.nodes: list[dict] = []

    def add(self, fn: str, inputs=(), values=()) -> int:
        self.nodes.append({"inputs": list(inputs), "function": fn, "value_inputs": list(values)})
        return len(self.nodes) - 1

    def filters(self, src: int, desc: dict) -> int:
        for attr in ATTRIBUTES:
            if desc.get(attr):
                src = self.add(f"filter_{attr}", [src], [desc[attr]])
        return src

    def unique(self, src: int, desc: dict) -> int:
        return self.add("unique", [self.filters(src, desc)])

    def scene_object(self, desc: dict) -> int:
        return self.unique(self.add("scene"), desc)


def phrase(desc: dict, rng: random.Random, plural: bool = False) -> str:
    """``{"size": "large", "color": "red", "shape": None}`` -> "large red thing(s)"."""
    nouns = NOUN[desc.get("shape")]
    noun = rng.choice(nouns) if len(nouns) > 1 else nouns[0]
    words = [desc[a] for a in ("size", "color", "material") if desc.get(a)] + [noun + ("s" if plural else "")]
    return " ".join(words)


# ---------------------------------------------------------------- scene helpers
class Ctx:
    """The scene seen by the templates, plus the random generator (``random.Random``:
    far cheaper per draw than numpy's for these many tiny choices)."""

    def __init__(self, scene: dict, rng: random.Random):
        self.objs = scene["objects"]
        self.rels = scene["relationships"]
        self.rng = rng
        self.n = len(self.objs)
        # keys[subset][i]: object i's values of the attributes in subset
        self.keys = {sub: [tuple(o[a] for a in ATTRIBUTES if a in sub) for o in self.objs]
                     for k in range(1, 5) for sub in _SUBSETS[k]}

    def pick(self, pool):
        pool = sorted(pool)
        return pool[self.rng.randrange(len(pool))] if pool else None

    def matches(self, pool, desc):
        return [i for i in pool if all(self.objs[i][a] == v for a, v in desc.items() if v)]

    def refer(self, target: int, pool, exclude=()) -> dict | None:
        """A description (attr -> value) that picks out ``target`` alone within ``pool``."""
        pool = list(pool)
        start = 1 if self.rng.random() < 0.7 else 2
        for k in list(range(start, 5)) + list(range(1, start)):
            subsets = [sub for sub in _SUBSETS[k] if not (sub & set(exclude))]
            self.rng.shuffle(subsets)
            for sub in subsets:
                keys = self.keys[sub]
                if sum(keys[j] == keys[target] for j in pool) == 1:
                    return {a: self.objs[target][a] for a in ATTRIBUTES if a in sub}
        return None

    def random_desc(self, pool, exclude=(), max_attrs=3, p_obj=0.8) -> dict:
        """A filter description, usually (``p_obj``) taken from an object of ``pool`` so it matches something."""
        allowed = [a for a in ATTRIBUTES if a not in exclude]
        k = min(self.rng.choice((0, 1, 1, 2, 2, 2, 3)), max_attrs, len(allowed))
        attrs = set(self.rng.sample(allowed, k))
        src = self.pick(pool) if (pool and self.rng.random() < p_obj) else None
        return {a: (self.objs[src][a] if src is not None else self.rng.choice(VALUES[a]))
                for a in ATTRIBUTES if a in attrs}

    def query_attr(self, desc: dict) -> str | None:
        free = [a for a in ATTRIBUTES if a not in desc]
        return self.rng.choice(free) if free else None

    def rel(self) -> str:
        return self.rng.choice(RELATIONS)


def _ending(c: Ctx, p: Program, kind: str, src: int, pool, tail: str):
    """count / exist / query over the objects ``pool`` (node ``src``), described by ``tail``
    (e.g. "left of the red cube").  Returns (text, program) or None."""
    if kind == "query":
        target = c.pick(pool)
        if target is None:
            return None
        desc = c.refer(target, pool)
        if desc is None:
            return None
        attr = c.query_attr(desc)
        if attr is None:
            return None
        p.add(f"query_{attr}", [p.unique(src, desc)])
        what = phrase(desc, c.rng)
        if c.rng.random() < 0.5:
            return f"What {attr} is the {what} {tail}?", p.nodes
        return f"What is the {attr} of the {what} that is {tail}?", p.nodes
    desc = c.random_desc(pool, p_obj=0.8 if kind == "count" else 0.55)
    out = p.filters(src, desc)
    if kind == "count":
        p.add("count", [out])
        return f"How many {phrase(desc, c.rng, True)} are {tail}?", p.nodes
    p.add("exist", [out])
    return f"Are there any {phrase(desc, c.rng, True)} {tail}?", p.nodes


# ------------------------------------------------------------------- families
def zero_hop(c: Ctx, kind: str):
    if kind == "query":
        return _zero_query(c)
    p = Program()
    everything = range(c.n)
    desc = c.random_desc(everything, p_obj=0.8 if kind == "count" else 0.4)
    out = p.filters(p.add("scene"), desc)
    if kind == "count":
        p.add("count", [out])
        return f"How many {phrase(desc, c.rng, True)} are there?", p.nodes
    p.add("exist", [out])
    return f"Are there any {phrase(desc, c.rng, True)}?", p.nodes


def _zero_query(c: Ctx):
    p = Program()
    target = c.pick(range(c.n))
    desc = c.refer(target, range(c.n))
    attr = desc is not None and c.query_attr(desc)
    if not attr:
        return None
    p.add(f"query_{attr}", [p.scene_object(desc)])
    what = phrase(desc, c.rng)
    if c.rng.random() < 0.5:
        return f"What {attr} is the {what}?", p.nodes
    return f"What is the {attr} of the {what}?", p.nodes


def hops(n_hops: int):
    """one_hop / two_hop / three_hop: follow ``n_hops`` relations from a unique object."""

    def sample(c: Ctx, kind: str):
        p = Program()
        anchor = c.pick(range(c.n))
        desc = c.refer(anchor, range(c.n))
        if desc is None:
            return None
        node, cur, text = p.scene_object(desc), anchor, f"the {phrase(desc, c.rng)}"
        for h in range(n_hops):
            rel = c.rel()
            pool = c.rels[rel][cur]
            node = p.add("relate", [node], [rel])
            text = f"{REL_TEXT[rel]} {text}"
            if h == n_hops - 1:
                return _ending(c, p, kind, node, pool, text)
            cur = c.pick(pool)
            if cur is None:
                return None
            d = c.refer(cur, pool)
            if d is None:
                return None
            node = p.unique(node, d)
            text = f"the {phrase(d, c.rng)} that is {text}"
    return sample


def single_and(c: Ctx, kind: str):
    p = Program()
    a, b = c.pick(range(c.n)), c.pick(range(c.n))
    if a == b:
        return None
    da, db = c.refer(a, range(c.n)), c.refer(b, range(c.n))
    if da is None or db is None:
        return None
    ra, rb = c.rel(), c.rel()
    na = p.add("relate", [p.scene_object(da)], [ra])
    nb = p.add("relate", [p.scene_object(db)], [rb])
    src = p.add("intersect", [na, nb])
    pool = set(c.rels[ra][a]) & set(c.rels[rb][b])
    tail = f"both {REL_TEXT[ra]} the {phrase(da, c.rng)} and {REL_TEXT[rb]} the {phrase(db, c.rng)}"
    return _ending(c, p, kind, src, pool, tail)


def _nested(d1: dict, d2: dict) -> bool:
    """One description contains the other ("red things" / "red cubes"): comparing or
    uniting them would give the answer away."""
    return d1.items() <= d2.items() or d2.items() <= d1.items()


def single_or(c: Ctx, kind: str):
    p = Program()
    p_obj = 0.6 if kind == "count" else 0.1
    d1, d2 = c.random_desc(range(c.n), p_obj=p_obj), c.random_desc(range(c.n), p_obj=p_obj)
    if not d1 or not d2 or _nested(d1, d2):
        return None
    src = p.add("union", [p.filters(p.add("scene"), d1), p.filters(p.add("scene"), d2)])
    what = f"{phrase(d1, c.rng, True)} or {phrase(d2, c.rng, True)}"
    if kind == "count":
        p.add("count", [src])
        return f"How many things are {what}?", p.nodes
    p.add("exist", [src])
    return f"Are there any things that are {what}?", p.nodes


def same_relate(c: Ctx, kind: str):
    p = Program()
    anchor = c.pick(range(c.n))
    attr = c.rng.choice(ATTRIBUTES)
    desc = c.refer(anchor, range(c.n), exclude=(attr,))
    if desc is None:
        return None
    src = p.add(f"same_{attr}", [p.scene_object(desc)])
    pool = [j for j in range(c.n) if j != anchor and c.objs[j][attr] == c.objs[anchor][attr]]
    same = f"the same {attr} as the {phrase(desc, c.rng)}"
    if kind == "query":
        target = c.pick(pool)
        d = target is not None and c.refer(target, pool, exclude=(attr,))
        q = d and c.query_attr({**d, attr: True})
        if not q:
            return None
        p.add(f"query_{q}", [p.unique(src, d)])
        return f"What {q} is the other {phrase(d, c.rng)} that has {same}?", p.nodes
    d = c.random_desc(pool, exclude=(attr,), max_attrs=2, p_obj=0.8 if kind == "count" else 0.5)
    out = p.filters(src, d)
    if kind == "count":
        p.add("count", [out])
        return f"How many other {phrase(d, c.rng, True)} have {same}?", p.nodes
    p.add("exist", [out])
    return f"Are there any other {phrase(d, c.rng, True)} that have {same}?", p.nodes


def compare_integer(c: Ctx, kind: str):
    p = Program()
    d1, d2 = c.random_desc(range(c.n)), c.random_desc(range(c.n))
    if _nested(d1, d2):
        return None
    n1 = p.add("count", [p.filters(p.add("scene"), d1)])
    n2 = p.add("count", [p.filters(p.add("scene"), d2)])
    p.add(kind, [n1, n2])
    a, b = phrase(d1, c.rng, True), phrase(d2, c.rng, True)
    text = {"equal_integer": f"Are there the same number of {a} and {b}?",
            "less_than": f"Are there fewer {a} than {b}?",
            "greater_than": f"Are there more {a} than {b}?"}[kind]
    return text, p.nodes


def comparison(c: Ctx, attr: str):
    p = Program()
    a = c.pick(range(c.n))
    alike = [j for j in range(c.n) if j != a and c.objs[j][attr] == c.objs[a][attr]]
    # propose "same" pairs half the time: two objects rarely share a colour by chance
    b = c.pick(alike) if (alike and c.rng.random() < 0.5) else c.pick(range(c.n))
    if a == b:
        return None
    da, db = c.refer(a, range(c.n), exclude=(attr,)), c.refer(b, range(c.n), exclude=(attr,))
    if da is None or db is None:
        return None
    qa = p.add(f"query_{attr}", [p.scene_object(da)])
    qb = p.add(f"query_{attr}", [p.scene_object(db)])
    p.add(f"equal_{attr}", [qa, qb])
    x, y = phrase(da, c.rng), phrase(db, c.rng)
    if attr == "material":
        return f"Are the {x} and the {y} made of the same material?", p.nodes
    if c.rng.random() < 0.5:
        return f"Is the {x} the same {attr} as the {y}?", p.nodes
    return f"Does the {x} have the same {attr} as the {y}?", p.nodes


@dataclass(frozen=True)
class Template:
    family: str
    kind: str
    sample: Callable  # (Ctx) -> (text, program nodes) | None


def _make():
    out = []
    for fam, fn in (("zero_hop", zero_hop), ("one_hop", hops(1)), ("two_hop", hops(2)),
                    ("three_hop", hops(3)), ("single_and", single_and)):
        out += [Template(fam, k, (lambda c, fn=fn, k=k: fn(c, k))) for k in ("count", "exist", "query")]
    out += [Template("single_or", k, (lambda c, k=k: single_or(c, k))) for k in ("count", "exist")]
    out += [Template("same_relate", k, (lambda c, k=k: same_relate(c, k))) for k in ("count", "exist", "query")]
    out += [Template("compare_integer", k, (lambda c, k=k: compare_integer(c, k)))
            for k in ("equal_integer", "less_than", "greater_than")]
    out += [Template("comparison", f"equal_{a}", (lambda c, a=a: comparison(c, a))) for a in ATTRIBUTES]
    return tuple(out)


TEMPLATES: tuple[Template, ...] = _make()
FAMILIES = ("zero_hop", "one_hop", "two_hop", "three_hop", "single_and", "single_or", "same_relate",
            "compare_integer", "comparison")
