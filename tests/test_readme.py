"""The README's tour runs as written (so the documentation cannot drift from the API)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_tour_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python block"
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["y"].shape == (64, 384, 14, 14)
    assert scope["y8"].shape == (8, 64, 384, 14, 14)
    assert scope["gates"].shape == (64, 16, 32)
    assert set(scope["gates"].unique().tolist()) <= {0.0, 1.0}
    assert scope["out"].shape == (8, 256, 28, 28)
    assert scope["h"].shape == (8, 128, 28, 28) and scope["z"].shape == (8, 256, 28, 28)


def test_commands_are_marked_for_ci():
    text = README.read_text()
    for tag in ("run-command", "test-command"):
        assert f"<!-- {tag} -->" in text and f"<!-- /{tag} -->" in text
