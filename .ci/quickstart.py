"""Runs the README's quickstart against the installed softtopk (the wheel check: run from outside the checkout)."""

import pathlib
import sys

import softtopk

readme = pathlib.Path(sys.argv[1]).read_text()
block = readme.split("```python\n", 1)[1].split("```", 1)[0]
assert "src" not in pathlib.Path(softtopk.__file__).parts, f"softtopk imported from the checkout: {softtopk.__file__}"
exec(compile(block, "README.md", "exec"), {})
print(f"quickstart ok with softtopk {softtopk.__version__} from {softtopk.__file__}")
