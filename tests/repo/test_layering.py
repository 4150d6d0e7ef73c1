"""The package layering of the design, checked on the source: imports go downward only, and no two
modules import each other (directly or around a loop), lazily inside a function or not."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# package -> the project packages it may import. protocol is the bottom layer; the task (medvqa) and the
# rewards know nothing of the plumbing; learner and rollout workers never import each other.
ALLOWED = {
    "protocol": set(),
    "rewards": {"protocol"},
    "medvqa": {"protocol"},
    "learner": {"protocol", "medvqa", "rewards"},
    "rollout_workers": {"protocol", "medvqa", "rewards"},
    "launcher": {"protocol", "medvqa", "rewards", "learner", "rollout_workers"},
}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for pkg in ALLOWED for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Project modules named by every import statement of the file, at any depth (inside a function, or
    under `if TYPE_CHECKING:`: a type-only import still ties the packages together)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in ALLOWED}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {i for i in _imports(p) if i in mods and i != m and not m.startswith(i + ".")}
            for m, p in mods.items()}


def test_every_package_imports_downward_only():
    bad = [f"{m} imports {i}" for m, p in _modules().items() for i in sorted(_imports(p))
           if i.split(".")[0] != m.split(".")[0] and i.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not bad, bad


def _cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n, path + [n])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_no_import_cycles():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_type_checking_and_lazy_imports_count(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from launcher.config import Config\n"
                 "def g():\n    import learner.grpo\n")
    assert _imports(f) == {"launcher.config", "launcher.config.Config", "learner.grpo"}


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_is_installed_by_pyproject(package):
    assert f'"{package}"' in (ROOT / "pyproject.toml").read_text().split("[tool.setuptools]")[1].split("\n\n")[0]
