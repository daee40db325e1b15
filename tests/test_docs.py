"""The user guide builds with `mkdocs build --strict` (a broken link between pages, a missing
anchor or a page left out of the nav fails it), and its generated pages hold what the code
holds: every `serve` setting of coordinator/config.py, every browser profile."""
import html
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_guide_builds_strict_with_generated_reference(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    from coordinator.config import _RULES
    from actors.profiles import PROFILES

    config = html.unescape((site / "configuration" / "index.html").read_text())
    for key in _RULES:
        assert f"<code>{key}</code>" in config, key
    assert "{{ settings_table }}" not in config and "no description" not in config
    browsers = (site / "browsers" / "index.html").read_text()
    assert all(name in browsers for name in PROFILES)
    api = (site / "api" / "index.html").read_text()
    assert "{{ sampling_defaults }}" not in api and re.search(r"<td>temperature</td>", api)


def test_readme_points_to_the_guide():
    readme = (ROOT / "README.md").read_text()
    assert "docs/" in readme and "make demo" in readme and "make test" in readme
