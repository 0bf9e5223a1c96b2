"""The source files a stage runs: every ``sd_distill`` module its entry imports, directly or through others.

``dvc.yaml`` lists these as the stage's code dependencies, so a change to any of them (MAC counting for
``evaluate``, the data store for the training stages) reruns the stage and nothing else. Read from the source with
``ast`` (imports inside functions included), so nothing is imported and no list is kept by hand.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = "sd_distill"
SRC = Path(__file__).resolve().parent.parent  # the folder holding the package (src/)


def module_file(module: str) -> Path | None:
    """``sd_distill.data.store`` -> ``src/sd_distill/data/store.py`` (or a package's ``__init__.py``)."""
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def direct_imports(module: str) -> frozenset[str]:
    """The ``sd_distill`` modules ``module`` imports anywhere in its file, and the packages that hold them."""
    path = module_file(module)
    if path is None:
        return frozenset()
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from sd_distill.data import latents`: latents may be a module of the package or a name in it
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        for name in names:
            if name.split(".")[0] != PACKAGE:
                continue
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))  # importing runs each package
    return frozenset(m for m in found if module_file(m) is not None)


def closure(module: str) -> list[str]:
    """Every ``sd_distill`` module that running ``module`` imports (itself included), sorted."""
    parts = module.split(".")
    seen, todo = set(), [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # its packages run first
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(direct_imports(current) - seen)
    return sorted(seen)


def stage_code(entry: str) -> list[str]:
    """The source files of stage entry ``"module:function"``, as ``src/sd_distill/...`` paths (a checkout's)."""
    files = {module_file(m) for m in closure(entry.split(":")[0])}
    return sorted(f.relative_to(SRC.parent).as_posix() for f in files if f is not None)
