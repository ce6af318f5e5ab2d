"""CLEVR functional programs and their executor.

A program is a list of nodes ``{"function": name, "inputs": [node indices],
"value_inputs": [str]}`` in topological order; the last node is the answer.
Some CLEVR releases (and the CLEVR generator's templates) spell these keys
``"type"`` and ``"side_inputs"``: :func:`node_function` / :func:`node_values`
accept both.  Values flowing between nodes: a set of objects (frozenset of
indices), one object (int), an attribute value (str), a count (int) or a
truth value (bool).
"""
from __future__ import annotations

from fastmod.data.scene import ATTRIBUTES, RELATIONS, VALUES


class IllPosedProgram(ValueError):
    """The program is well formed but has no well-defined answer on this scene
    (e.g. ``unique`` of a set that is not a singleton).  CLEVR rejects these."""


class _Obj(int):
    """An object reference (kept apart from counts, which are plain ints)."""


def node_function(node: dict) -> str:
    fn = node.get("function", node.get("type"))
    if not isinstance(fn, str):
        raise ValueError(f"program node {node!r} has no 'function' (or 'type') string")
    return fn


def node_values(node: dict) -> list:
    return list(node.get("value_inputs", node.get("side_inputs", [])) or [])


def program_to_tokens(program: list[dict]) -> list[str]:
    """clevr-iep's program tokens, in CLEVR's (postfix) node order: ``filter_color[red]``."""
    out = []
    for node in program:
        vals = node_values(node)
        out.append(f"{node_function(node)}[{','.join(vals)}]" if vals else node_function(node))
    return out


def _set(v, fn):
    if not isinstance(v, frozenset):
        raise ValueError(f"{fn} expects a set of objects, got {v!r}")
    return v


def _obj(v, fn):
    if not isinstance(v, _Obj):
        raise ValueError(f"{fn} expects one object (the output of unique), got {v!r}")
    return v


def _int(v, fn):
    if not isinstance(v, int) or isinstance(v, (bool, _Obj)):
        raise ValueError(f"{fn} expects a count, got {v!r}")
    return v


def _apply(fn: str, args: list, vals: list, objects: list[dict], rels: dict):
    if fn == "scene":
        return frozenset(range(len(objects)))
    if fn.startswith("filter_") and fn[7:] in VALUES:
        attr, (value,) = fn[7:], vals
        return frozenset(i for i in _set(args[0], fn) if objects[i][attr] == value)
    if fn == "unique":
        s = _set(args[0], fn)
        if len(s) != 1:
            raise IllPosedProgram(f"unique applied to a set of {len(s)} objects")
        return _Obj(next(iter(s)))
    if fn == "relate":
        (rel,) = vals
        if rel not in rels:
            raise ValueError(f"relate: unknown relation {rel!r} (scene has {sorted(rels)})")
        return frozenset(rels[rel][_obj(args[0], fn)])
    if fn == "count":
        return len(_set(args[0], fn))
    if fn == "exist":
        return len(_set(args[0], fn)) > 0
    if fn in ("intersect", "union"):
        a, b = _set(args[0], fn), _set(args[1], fn)
        return a & b if fn == "intersect" else a | b
    if fn.startswith("query_") and fn[6:] in VALUES:
        return objects[_obj(args[0], fn)][fn[6:]]
    if fn.startswith("same_") and fn[5:] in VALUES:
        attr, i = fn[5:], _obj(args[0], fn)
        return frozenset(j for j, o in enumerate(objects) if j != i and o[attr] == objects[i][attr])
    if fn.startswith("equal_") and fn[6:] in VALUES:
        a, b = args
        if not (isinstance(a, str) and isinstance(b, str)):
            raise ValueError(f"{fn} expects two attribute values, got {a!r}, {b!r}")
        return a == b
    if fn in ("equal_integer", "less_than", "greater_than"):
        a, b = _int(args[0], fn), _int(args[1], fn)
        return a == b if fn == "equal_integer" else (a < b if fn == "less_than" else a > b)
    raise ValueError(f"unknown program function {fn!r}")


FUNCTIONS = (("scene", "unique", "relate", "count", "exist", "intersect", "union",
              "equal_integer", "less_than", "greater_than")
             + tuple(f"{p}_{a}" for p in ("filter", "query", "same", "equal") for a in ATTRIBUTES))


def execute(program: list[dict], scene: dict, *, trace: bool = False):
    """Run ``program`` on ``scene`` and return the answer as a CLEVR answer string
    (``"yes"``/``"no"``, a count, or an attribute value).

    Raises :class:`IllPosedProgram` when the answer is undefined on this scene and
    ``ValueError`` for a malformed program.  With ``trace=True`` returns
    ``(answer, [value of every node])`` instead.
    """
    objects = scene["objects"]
    rels = scene.get("relationships", {})
    outs: list = []
    for k, node in enumerate(program):
        fn = node_function(node)
        ins = node.get("inputs", [])
        if any((not isinstance(i, int)) or i < 0 or i >= k for i in ins):
            raise ValueError(f"program node {k} ({fn}) has inputs {ins}; they must index earlier nodes")
        outs.append(_apply(fn, [outs[i] for i in ins], node_values(node), objects, rels))
    if not outs:
        raise ValueError("empty program")
    ans = outs[-1]
    if isinstance(ans, bool):
        ans = "yes" if ans else "no"
    elif isinstance(ans, (frozenset, _Obj)):
        raise ValueError(f"program ends in {program[-1]!r}, which returns objects, not an answer")
    else:
        ans = str(ans)
    return (ans, outs) if trace else ans


__all__ = ["execute", "IllPosedProgram", "FUNCTIONS", "RELATIONS", "node_function", "node_values",
           "program_to_tokens"]
