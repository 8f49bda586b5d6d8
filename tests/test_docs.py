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
