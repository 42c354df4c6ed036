"""The layers of docs/ARCHITECTURE.md hold: import-linter's contract in setup.cfg, run on the package,
and shown to catch an import that runs up a layer."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from recipes import REPO

LINT = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]


def lint(cwd: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(LINT + ["--config", "setup.cfg", "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_no_module_imports_up_a_layer():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_the_contract_catches_an_import_up_a_layer(tmp_path):
    shutil.copytree(REPO / "segfocal", tmp_path / "segfocal", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "recipes"))
    shutil.copy(REPO / "setup.cfg", tmp_path / "setup.cfg")
    schema = tmp_path / "segfocal" / "config" / "schema.py"
    schema.write_text(schema.read_text() + "\nfrom ..engine import timeline  # noqa: E402,F401  (up a layer)\n")
    result = lint(tmp_path, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert result.returncode != 0
    assert "segfocal.config.schema -> segfocal.engine.timeline" in result.stdout, result.stdout[-3000:]
