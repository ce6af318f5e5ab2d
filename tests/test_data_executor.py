"""The CLEVR program executor on hand-built scenes (every function), and question types."""
import pytest

from fastmod.data import QUESTION_SUBTYPES, QUESTION_TYPES, IllPosedProgram, execute, question_type
from fastmod.data.qtypes import question_type_from_text
from fastmod.data.scene import compute_relationships


def obj(shape, color, size, material, x, y):
    return {"shape": shape, "color": color, "size": size, "material": material, "3d_coords": [x, y, 0.5]}


# 0: large red metal cube at the front left; 1: small blue rubber sphere, right of 0, behind it;
# 2: large red rubber cylinder, far right, front; 3: small gray metal cube, middle, far back
OBJECTS = [obj("cube", "red", "large", "metal", -2.0, -2.0), obj("sphere", "blue", "small", "rubber", 0.0, 1.0),
           obj("cylinder", "red", "large", "rubber", 2.0, -1.0), obj("cube", "gray", "small", "metal", 0.5, 2.5)]
SCENE = {"objects": OBJECTS, "relationships": compute_relationships(OBJECTS)}


def n(fn, inputs=(), values=()):
    return {"function": fn, "inputs": list(inputs), "value_inputs": list(values)}


def run(*nodes):
    return execute(list(nodes), SCENE)


def test_relationships_follow_clevr_rule():
    rel = SCENE["relationships"]
    assert rel["left"][1] == [0]          # left of the sphere: the red cube
    assert rel["right"][0] == [1, 2, 3]
    assert rel["behind"][0] == [1, 2, 3]
    assert rel["front"][3] == [0, 1, 2]
    assert rel["behind"][3] == [] and rel["left"][0] == []


@pytest.mark.parametrize("attr,value,expected", [
    ("color", "red", "2"), ("color", "blue", "1"), ("color", "green", "0"), ("shape", "cube", "2"),
    ("size", "small", "2"), ("material", "metal", "2"), ("material", "rubber", "2")])
def test_scene_filter_count(attr, value, expected):
    assert run(n("scene"), n(f"filter_{attr}", [0], [value]), n("count", [1])) == expected


def test_scene_and_exist():
    assert run(n("scene"), n("count", [0])) == "4"
    assert run(n("scene"), n("filter_color", [0], ["red"]), n("exist", [1])) == "yes"
    assert run(n("scene"), n("filter_color", [0], ["cyan"]), n("exist", [1])) == "no"


@pytest.mark.parametrize("attr,expected", [("size", "small"), ("color", "blue"), ("material", "rubber"),
                                           ("shape", "sphere")])
def test_unique_query(attr, expected):
    assert run(n("scene"), n("filter_shape", [0], ["sphere"]), n("unique", [1]), n(f"query_{attr}", [2])) == expected


def test_unique_ill_posed():
    with pytest.raises(IllPosedProgram, match="2 objects"):
        run(n("scene"), n("filter_color", [0], ["red"]), n("unique", [1]), n("query_shape", [2]))
    with pytest.raises(IllPosedProgram, match="0 objects"):
        run(n("scene"), n("filter_color", [0], ["cyan"]), n("unique", [1]), n("query_shape", [2]))


@pytest.mark.parametrize("rel,expected", [("left", "1"), ("right", "1"), ("front", "1"), ("behind", "1")])
def test_relate(rel, expected):
    # from the sphere (1): left -> {0}; right -> {2, 3}, of which large: {2}; front -> {0, 2}, cubes: {0};
    # behind -> {3}
    filt = {"left": n("filter_color", [3], ["red"]), "right": n("filter_size", [3], ["large"]),
            "front": n("filter_shape", [3], ["cube"]), "behind": n("filter_material", [3], ["metal"])}[rel]
    prog = [n("scene"), n("filter_shape", [0], ["sphere"]), n("unique", [1]), n("relate", [2], [rel]), filt,
            n("count", [4])]
    assert execute(prog, SCENE) == expected
    ans, trace = execute(prog, SCENE, trace=True)
    assert sorted(trace[3]) == sorted(SCENE["relationships"][rel][1])


def test_intersect_union():
    base = [n("scene"), n("filter_color", [0], ["red"]), n("scene"), n("filter_material", [2], ["metal"])]
    assert execute(base + [n("intersect", [1, 3]), n("count", [4])], SCENE) == "1"
    assert execute(base + [n("union", [1, 3]), n("count", [4])], SCENE) == "3"


@pytest.mark.parametrize("attr,expected", [("color", "1"), ("shape", "1"), ("size", "1"), ("material", "1")])
def test_same_excludes_the_object_itself(attr, expected):
    # the red cube (0): same colour {2}, same shape {3}, same size {2}, same material {3}
    prog = [n("scene"), n("filter_color", [0], ["red"]), n("filter_shape", [1], ["cube"]), n("unique", [2]),
            n(f"same_{attr}", [3]), n("count", [4])]
    assert execute(prog, SCENE) == expected


def _the(color, shape, start):
    """Nodes picking out the unique object with this colour and shape, from node index ``start``."""
    return [n("scene"), n("filter_color", [start], [color]), n("filter_shape", [start + 1], [shape]),
            n("unique", [start + 2])]


@pytest.mark.parametrize("attr,first,second,expected", [
    ("color", ("blue", "sphere"), ("red", "cylinder"), "no"), ("color", ("red", "cube"), ("red", "cylinder"), "yes"),
    ("shape", ("red", "cube"), ("gray", "cube"), "yes"), ("shape", ("blue", "sphere"), ("red", "cylinder"), "no"),
    ("size", ("blue", "sphere"), ("gray", "cube"), "yes"), ("size", ("blue", "sphere"), ("red", "cylinder"), "no"),
    ("material", ("blue", "sphere"), ("red", "cylinder"), "yes"),
    ("material", ("red", "cube"), ("red", "cylinder"), "no"),
])
def test_equal_attribute(attr, first, second, expected):
    prog = _the(*first, 0) + [n(f"query_{attr}", [3])] + _the(*second, 5) + [n(f"query_{attr}", [8])]
    prog.append(n(f"equal_{attr}", [4, 9]))
    assert execute(prog, SCENE) == expected


@pytest.mark.parametrize("fn,c1,c2,expected", [
    ("equal_integer", "red", "metal", "yes"), ("equal_integer", "red", "blue", "no"),
    ("less_than", "blue", "red", "yes"), ("less_than", "red", "blue", "no"),
    ("greater_than", "red", "blue", "yes"), ("greater_than", "blue", "red", "no")])
def test_compare_integer(fn, c1, c2, expected):
    def count(value, start):
        key = "material" if value == "metal" else "color"
        return [n("scene"), n(f"filter_{key}", [start], [value]), n("count", [start + 1])]
    prog = count(c1, 0) + count(c2, 3) + [n(fn, [2, 5])]
    assert execute(prog, SCENE) == expected


def test_legacy_type_and_side_inputs_keys():
    prog = [{"type": "scene", "inputs": []}, {"type": "filter_color", "inputs": [0], "side_inputs": ["red"]},
            {"type": "count", "inputs": [1]}]
    assert execute(prog, SCENE) == "2"
    assert question_type(prog) == ("count", "count")


@pytest.mark.parametrize("prog,match", [
    ([], "empty"), ([n("scene"), n("frobnicate", [0])], "unknown program function"),
    ([n("scene"), n("count", [3])], "earlier nodes"), ([n("scene"), n("query_color", [0])], "one object"),
    ([n("scene"), n("relate", [0], ["left"])], "one object"), ([n("scene")], "returns objects"),
    ([n("scene"), n("count", [0]), n("equal_color", [1, 1])], "attribute values"),
    ([n("scene"), n("filter_shape", [0], ["sphere"]), n("unique", [1])], "returns objects"),
    ([n("scene"), n("filter_shape", [0], ["sphere"]), n("unique", [1]), n("relate", [2], ["above"]),
      n("count", [3])], "unknown relation"),
    ([{"inputs": []}], "no 'function'")])
def test_malformed_programs_raise(prog, match):
    with pytest.raises(ValueError, match=match):
        execute(prog, SCENE)


def test_question_types_cover_table1():
    expected = {"exist": "exist", "count": "count", "equal_integer": "compare_number",
                "less_than": "compare_number", "greater_than": "compare_number"}
    expected.update({f"query_{a}": "query_attribute" for a in ("size", "color", "material", "shape")})
    expected.update({f"equal_{a}": "compare_attribute" for a in ("size", "color", "material", "shape")})
    assert set(expected) == set(QUESTION_SUBTYPES) and len(QUESTION_SUBTYPES) == 13
    assert set(expected.values()) == set(QUESTION_TYPES) and len(QUESTION_TYPES) == 5
    for sub, typ in expected.items():
        assert question_type([n("scene"), n(sub, [0])]) == (typ, sub)
    assert question_type(None) == ("unknown", "unknown")
    assert question_type([]) == ("unknown", "unknown")
    assert question_type([n("scene"), n("unique", [0])]) == ("unknown", "unknown")


def test_question_type_from_text_only_when_derivable():
    assert question_type_from_text("How many red cubes are there?") == ("count", "count")
    assert question_type_from_text("Is there a red cube?") == ("unknown", "unknown")
    assert question_type_from_text("Is it?", "3") == ("count", "count")
    assert question_type_from_text("What is it?", "cyan") == ("query_attribute", "query_color")
    assert question_type_from_text("Are there more cubes than balls?", "yes") == ("unknown", "unknown")
