"""Question types: the five columns of LNMN's / QGMRN's Table 1 and 13 subtypes,
read off the last function of a question's program."""
from __future__ import annotations

import re

QUESTION_TYPES = ("count", "exist", "compare_number", "query_attribute", "compare_attribute")
QUESTION_SUBTYPES = ("exist", "count", "equal_integer", "less_than", "greater_than",
                     "query_size", "query_color", "query_material", "query_shape",
                     "equal_size", "equal_color", "equal_material", "equal_shape")
UNKNOWN = ("unknown", "unknown")

_TYPE_OF = {"exist": "exist", "count": "count", "equal_integer": "compare_number",
            "less_than": "compare_number", "greater_than": "compare_number"}
_TYPE_OF.update({f"query_{a}": "query_attribute" for a in ("size", "color", "material", "shape")})
_TYPE_OF.update({f"equal_{a}": "compare_attribute" for a in ("size", "color", "material", "shape")})


def subtype_of_function(fn: str | None) -> tuple[str, str]:
    """``"query_color"`` -> ("query_attribute", "query_color"); also takes clevr-iep
    program tokens such as ``"filter_color[red]"`` (the ``[...]`` is dropped)."""
    if not isinstance(fn, str):
        return UNKNOWN
    fn = fn.split("[", 1)[0]
    t = _TYPE_OF.get(fn)
    return (t, fn) if t else UNKNOWN


def question_type(program) -> tuple[str, str]:
    """(type, subtype) of a CLEVR program (list of nodes with ``function`` or ``type``),
    from its last node; ("unknown", "unknown") if there is no program or the last
    function is not an answer-producing one."""
    if not program:
        return UNKNOWN
    last = program[-1]
    if isinstance(last, dict):
        return subtype_of_function(last.get("function", last.get("type")))
    return subtype_of_function(last)


_NUM = {str(i) for i in range(11)}
_ATTR_OF_ANSWER = {**{v: "size" for v in ("small", "large")},
                   **{v: "material" for v in ("rubber", "metal")},
                   **{v: "shape" for v in ("cube", "sphere", "cylinder")},
                   **{v: "color" for v in ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")}}
_COUNT_RE = re.compile(r"^\s*(how many|what number of)\b", re.I)
_COMPARE_RE = re.compile(r"\b(more|fewer|less|same number|equal number|greater)\b", re.I)


def question_type_from_text(question: str | None, answer: str | None = None) -> tuple[str, str]:
    """Type of a question without a program, where it is unambiguous: a count or an
    attribute-valued answer, or a "How many ..." question that compares nothing.
    Everything else (yes/no questions in particular) is ("unknown", "unknown")."""
    if answer is not None:
        if answer in _NUM:
            return ("count", "count")
        if answer in _ATTR_OF_ANSWER:
            return ("query_attribute", f"query_{_ATTR_OF_ANSWER[answer]}")
    if isinstance(question, str) and _COUNT_RE.search(question) and not _COMPARE_RE.search(question):
        return ("count", "count")
    return UNKNOWN
