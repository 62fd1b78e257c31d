"""No module imports from a layer above its own: every import of ``vpd_ray/`` (function-level ones
included) is checked against the layer table of docs/architecture.md."""

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "vpd_ray")


def layer_table() -> dict[str, int]:
    """``{"engine/": 5, "config": 4, ...}`` from the "| layer | modules |" table."""
    with open(os.path.join(REPO, "docs", "architecture.md")) as f:
        text = f.read()
    table = {}
    for number, modules in re.findall(r"^\| (\d+) [^|]*\| (.*) \|$", text, re.M):
        for name in re.findall(r"`([^`]+)`", modules):
            table[name] = int(number)
    return table


def module_names() -> list[str]:
    """``engine/loop``, ``tasks/__init__``, ``config``, ... for every module of the package but its root."""
    names = []
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.relpath(os.path.join(root, name), PACKAGE)
            if name.endswith(".py") and path != "__init__.py":
                names.append(path[:-3])
    return names


def layer_of(module: str, table: dict[str, int]) -> int:
    """The layer of ``engine/loop`` (its package's row) or ``config`` (its own row)."""
    parts = module.split("/")
    for depth in range(len(parts), 0, -1):
        prefix = "/".join(parts[:depth])
        for key in (prefix, prefix + "/"):
            if key in table and (key.endswith("/") or depth == len(parts)):
                return table[key]
    raise KeyError(f"vpd_ray/{module}.py is in no layer of docs/architecture.md")


def imports(module: str) -> set[str]:
    with open(os.path.join(PACKAGE, module + ".py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        if isinstance(node, ast.ImportFrom) and node.module == "vpd_ray":
            names = [f"vpd_ray.{a.name}" for a in node.names]
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n for n in names if n.startswith("vpd_ray.")}
    return {n[len("vpd_ray."):].replace(".", "/") for n in found}


def _resolve(target: str, modules: set[str]) -> str:
    """``tasks`` (a package's __init__) or ``engine/checkpoint`` -> a table key's module."""
    return target if target in modules else target + "/__init__"


def test_every_module_is_in_a_layer_and_imports_only_downward():
    table, modules = layer_table(), set(module_names())
    assert len(table) > 20, "the layer table of docs/architecture.md was not found"
    upward = []
    for module in sorted(modules):
        own = layer_of(module, table)
        for target in sorted(imports(module)):
            theirs = layer_of(_resolve(target, modules), table)
            if theirs > own:
                upward.append(f"vpd_ray/{module}.py (layer {own}) imports vpd_ray.{target.replace('/', '.')} (layer {theirs})")
    assert not upward, "\n".join(upward)
