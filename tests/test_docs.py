"""The generated documentation stays in step with the code."""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_api_page_and_readme_method_table_are_current(monkeypatch, capsys):
    """docs/api.md and the README's method table are written by docs/gen_api.py from the registry and the
    signatures; a rename that forgot them fails here."""
    monkeypatch.setattr(sys, "argv", ["gen_api.py", "--check"])
    try:
        runpy.run_path(str(ROOT / "docs" / "gen_api.py"), run_name="__main__")
    except SystemExit as stop:
        assert stop.code == 0, capsys.readouterr().err


def _python_blocks(path: Path) -> list[str]:
    text = path.read_text()
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


def test_readme_and_getting_started_code_runs():
    """Every ```python block of the README and of the getting-started page runs as written (in order, one namespace
    per file), so that the first code a user copies works."""
    for path in (ROOT / "README.md", ROOT / "docs" / "getting-started.md"):
        namespace: dict = {}
        blocks = _python_blocks(path)
        assert blocks, f"no python block in {path.name}"
        for block in blocks:
            exec(compile(block, str(path), "exec"), namespace)  # noqa: S102
