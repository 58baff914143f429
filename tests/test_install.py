"""The install as a user runs it: nothing at the repository root shadows a dependency.

Python puts the current folder first on `sys.path` (`python -m`, `python -c`, pytest), so a
root-level package named like an installed distribution's module wins over it. Hugging
Face's `kernels` (required by transformers >= 5.25 and by SGLang) was shadowed once by a
root-level `kernels/` package, and every transformers import failed.
"""

import ast
import importlib.metadata
import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _importable_root_names() -> set[str]:
    """Names a plain `import NAME` resolves to a regular module or package at the root."""
    names = set()
    for entry in REPO_ROOT.iterdir():
        if entry.suffix == ".py" and entry.name != "setup.py":
            names.add(entry.stem)
        elif (entry / "__init__.py").is_file():
            names.add(entry.name)
    return names


def test_no_root_package_shadows_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()
    ours = {"mopd_megatron"}
    clashes = {name: installed[name] for name in _importable_root_names() - ours
               if name in installed}
    assert not clashes, f"root-level packages shadow installed distributions: {clashes}"
    assert _importable_root_names() == ours


def test_transformers_and_the_engine_work_from_the_repository_root(tiny_moe_dir, tmp_path):
    """As the README's commands run: from the root, with HF's `kernels` installed."""
    script = textwrap.dedent(f"""
        import importlib.util, json
        import transformers.activations  # imports HF `kernels` in transformers >= 5.25
        from mopd_megatron.config import EngineConfig
        from mopd_megatron.rollout import start_engine
        spec = importlib.util.find_spec("kernels")
        with start_engine(EngineConfig(engine="local"), {str(tiny_moe_dir)!r},
                          {str(tmp_path)!r}, startup_timeout_s=300) as engine:
            healthy = engine.client.health()
        print(json.dumps({{"kernels": spec and spec.origin, "healthy": healthy}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["healthy"]
    if importlib.metadata.packages_distributions().get("kernels"):
        assert "site-packages" in found["kernels"], found["kernels"]
    assert not str(found["kernels"] or "").startswith(str(REPO_ROOT / "kernels"))


def test_the_package_never_imports_the_experiments_nor_matplotlib_at_import():
    """Experiments are one-way (they use the package, never the reverse), and the training
    loop does not load matplotlib: only the report's plotting functions do."""
    package = REPO_ROOT / "mopd_megatron"
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "experiments" for n in names), path
    script = "import sys, mopd_megatron.cli, mopd_megatron.train; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "False", done.stderr[-2000:]
