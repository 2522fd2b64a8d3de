"""The house: the package's import graph has no circles and no module uses
another's private names; the documented API imports; the README stays a
user's page whose links all work."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re

from conftest import ROOT

PACKAGES = {"mlx_mtpd": ROOT / "mlx_mtpd", "mlx_mtpd.convert": ROOT / "convert"}


def _modules():
    mods = {}
    for pkg, base in PACKAGES.items():
        for f in base.rglob("*.py"):
            parts = [pkg] + list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def _imports(mods):
    """{module: {(imported module, name or None)}}, lazy imports included."""
    out = {}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {(a.name, None) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    found.add((sub, None) if sub in mods else (target, a.name))
        out[mod] = {(t, n) for t, n in found if t in mods and t != mod}
    return out


def test_no_import_circles():
    mods = _modules()
    edges = {m: {t for t, _ in e} for m, e in _imports(mods).items()}

    def reach(a):
        seen, todo = set(), [a]
        while todo:
            for b in edges[todo.pop()]:
                if b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    circles = sorted({tuple(sorted((a, b))) for a in mods for b in edges[a] if a in reach(b)})
    assert not circles, circles


def test_no_private_names_across_modules():
    mods = _modules()
    bad = [(m, t, n) for m, e in _imports(mods).items() for t, n in e
           if n and n.startswith("_") and not n.startswith("__")]
    bad += [(m, t, None) for m, e in _imports(mods).items() for t, _ in e if t.rsplit(".", 1)[-1].startswith("_")
            and not t.endswith("__init__")]
    assert not bad, bad
    # nothing of the project's is written into mlx-lm's objects
    for m, path in mods.items():
        assert "__dict__[\"_mtpd" not in path.read_text() or m.endswith("heads"), m


def test_training_is_its_own_package_and_inference_never_imports_it():
    mods = _modules()
    imports = _imports(mods)
    training = {m for m in mods if m.startswith("mlx_mtpd.training")}
    assert {"mlx_mtpd.training.train", "mlx_mtpd.training.gen_data", "mlx_mtpd.training.eval_heads",
            "mlx_mtpd.training.dataset", "mlx_mtpd.training.data_cache", "mlx_mtpd.training.capture",
            "mlx_mtpd.training.init_heads"} <= training
    core = ["mlx_mtpd.engine", "mlx_mtpd.planner", "mlx_mtpd.head_drafts", "mlx_mtpd.tree", "mlx_mtpd.suffix",
            "mlx_mtpd.heads", "mlx_mtpd.streaming", "mlx_mtpd.session", "mlx_mtpd.chat", "mlx_mtpd.server"]
    for m in core:
        assert not {t for t, _ in imports[m]} & training, m


def test_documented_api_imports():
    import mlx_mtpd
    from mlx_mtpd.cli import SUBCOMMANDS

    assert callable(mlx_mtpd.load) and issubclass(mlx_mtpd.MTPDError, Exception) and mlx_mtpd.__version__
    gen = importlib.import_module("mlx_mtpd.generate")
    for name in ("generate", "stream_generate", "GenerationResponse"):
        assert hasattr(gen, name), name
    eng = importlib.import_module("mlx_mtpd.engine")
    for name in ("mtp_generate_step", "DraftState", "DraftPlanner", "SpecStats", "make_logprobs_transform"):
        assert hasattr(eng, name), name
    for sub, module in SUBCOMMANDS.items():
        assert callable(importlib.import_module(module).main), sub
    text = (ROOT / "pyproject.toml").read_text()
    for target in re.findall(r'= "(mlx_mtpd[\w.]*):main"', text):
        assert callable(importlib.import_module(target).main), target


def test_readme_is_a_users_page_and_its_links_work():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    first = readme.split("```sh\n", 1)[1].splitlines()[:2]  # the two set-up commands come first
    assert first[0].startswith("make chat ") and first[1].startswith("make test "), first
    make = (ROOT / "Makefile").read_text()
    assert "\nchat: setup" in make and "\ntest: setup" in make
    for page in [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")):
        for target in re.findall(r"\]\(([^)#\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            assert (page.parent / target).exists(), (page.name, target)


def test_scripts_import_what_exists():
    """Every name a script under scripts/ imports from the package exists
    (a renamed helper once left three profiling scripts failing at start)."""
    missing = []
    for path in sorted((ROOT / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlx_mtpd"):
                mod = importlib.import_module(node.module)
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(mod, a.name) and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert not missing, missing
