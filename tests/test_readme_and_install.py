"""The README is true: its site table is the one table in ``model/sites.py``, its tour runs, and
the package installs under one name, so a user's ``model.py`` and ``hooks.py`` cannot shadow it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from interp.model.sites import SITES, markdown_table, tl_markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def tour_code() -> str:
    """The README's first python block (the short tour)."""
    return re.search(r"```python\n(.*?)```", README, re.S).group(1)


def python_blocks() -> list[tuple[int, str]]:
    """Every python block of the README, ``(line of its first code line, code)``, in order."""
    return [(README[:m.start()].count("\n") + 2, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", README, re.S)]


RUN_BLOCKS = """
import json, sys, time
ns = {}
for i, (line, code) in enumerate(json.load(open(sys.argv[1]))):
    t = time.time()
    exec(compile(code, f"README.md, python block {i} (line {line})", "exec"), ns)
    print(f"README block {i} (line {line}) ran in {time.time() - t:.1f} s", flush=True)
print("README OK")
"""


def test_readme_python_blocks_are_found():
    """The snippet test below sees every block: the tour first, then the later sections' blocks."""
    blocks = python_blocks()
    assert blocks[0][1] == tour_code() and len(blocks) >= 5
    assert README.count("```python") == len(blocks)


@pytest.mark.subprocess
def test_every_readme_python_snippet_runs_in_order(tmp_path, demo_path):
    """The README's python blocks, run as written, one after another in one namespace (a later block
    uses what an earlier one made, as a reader would), in a fresh folder for the files they write.
    A failure names the block and its line; fix the README, not this test."""
    blocks = tmp_path / "blocks.json"
    blocks.write_text(json.dumps(python_blocks()), encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, "-c", RUN_BLOCKS, str(blocks)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "README OK" in proc.stdout


def test_readme_site_table_is_the_site_table():
    assert markdown_table() in README, "regenerate the README table from interp.model.sites.markdown_table()"
    for site in SITES:
        assert f"`{site.name()}`" in README


def test_readme_transformerlens_table_is_the_site_table():
    assert tl_markdown_table() in README, "regenerate the README table from interp.model.sites.tl_markdown_table()"


def test_pyproject_lists_every_package():
    """A subpackage missing from pyproject's list would be missing from the wheel."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    listed = set(re.search(r"^packages = \[(.*?)\]", text, re.M).group(1).replace('"', "").replace(" ", "").split(","))
    on_disk = {"interp"} | {"interp." + p.parent.name for p in (ROOT / "interp").glob("*/__init__.py")}
    assert on_disk | {"interp.model", "interp.hooks"} == listed


@pytest.mark.subprocess
def test_wheel_installs_one_namespace_and_the_tour_runs_next_to_a_users_model_py(tmp_path, demo_path):
    """A non-editable install (the wheel, unpacked), run from a research folder that holds its own
    ``model.py`` and ``hooks.py``: the tour must run and import nothing from them."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(wheels)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("gemma3_interp-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"interp"}, f"the wheel installs top-level names {sorted(tops)}"
    research = tmp_path / "research"
    research.mkdir()
    for name in ("model", "hooks"):
        (research / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}.py was imported')\n")
    script = ("import interp, interp.model, interp.hooks\n"
              f"assert interp.__file__.startswith({str(site)!r}), interp.__file__\n"
              "import sys\nassert 'model' not in sys.modules and 'hooks' not in sys.modules\n"
              + tour_code() + "\nprint('TOUR OK')\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=research, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TOUR OK" in proc.stdout
