"""The layout's one rule: imports point down the floors, never up (docs/ARCHITECTURE.md).

    benchmarks, pipeline.cli, pipeline.train -> pipeline.jobs -> pipeline.components -> pipeline.data
    -> pipeline.support -> shards -> mcci_models

Read with ``ast`` from the source, so imports inside functions count too.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("benchmarks", "pipeline", "shards", "mcci_models")
FLOORS = (  # top first; a module may import its own floor and those below it
    ("benchmarks", "pipeline.cli", "pipeline.train"),
    ("pipeline.jobs",),
    ("pipeline.components",),
    ("pipeline.data",),
    ("pipeline.support",),
    ("shards",),
    ("mcci_models",),
)


def floor(module: str) -> int | None:
    """The floor of a project module (longest matching prefix), None for outside modules."""
    if module == "pipeline":  # the package docstring only; any other top-level module needs a floor
        return 0
    best = None
    for level, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (level, len(prefix))
    return None if best is None else best[0]


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) for every absolute import in ``source``; ``from pkg import name`` counts as
    ``pkg.name`` so that importing a submodule by name is seen."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def upward_imports(module: str, source: str) -> list[str]:
    here = floor(module)
    return [f"{module}:{line} imports {target}" for line, target in imported_modules(source)
            if (there := floor(target)) is not None and here is not None and there < here]


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def test_every_module_has_a_floor():
    assert [m for m in project_modules() if floor(m) is None] == [], \
        "a new module under pipeline/ belongs in jobs/, components/, data/ or support/ (see docs/ARCHITECTURE.md)"


def test_no_import_points_up_the_floors():
    violations = [v for module, path in sorted(project_modules().items())
                  for v in upward_imports(module, path.read_text())]
    assert violations == []


def test_the_check_sees_upward_imports_at_any_depth():
    assert upward_imports("shards.attacks.lc", "def f():\n    from pipeline.jobs.evaluate import load\n") == [
        "shards.attacks.lc:2 imports pipeline.jobs.evaluate.load"]
    assert upward_imports("pipeline.data.loaders", "import pipeline.components.models\n") != []
    assert upward_imports("pipeline.support.config", "from pipeline import jobs\n") != []
    assert upward_imports("pipeline.jobs.train", "from pipeline.data.loaders import x\nimport torch\n") == []
