"""The package's layers, read from its source (no root needed): each imports only
the layers below it, and nothing of the test lab or fault hooks is in the product."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bwplugin"
# bottom to top: the CNI contract, the kernel side, one module per command, the
# in-process door, the node's processes
LAYERS = ["cni", "datapath", "commands", "cli", "node"]


def layer_of(module: str) -> int:
    """bwplugin.datapath.tc -> 1; bwplugin.cli -> 3; bwplugin.__main__ runs the cli."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else ""
    return LAYERS.index("node" if name == "__main__" else name) if name in (*LAYERS, "__main__") else -1


def imports_of(path: Path, root: Path = PACKAGE) -> set[str]:
    module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
            out.update(n for n in names if n.startswith("bwplugin"))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("bwplugin"))
    return out


def upward_imports(root: Path = PACKAGE) -> list[str]:
    found = []
    for path in root.rglob("*.py"):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        for target in imports_of(path, root):
            if target not in ("bwplugin", "bwplugin.__init__") and layer_of(target) > layer_of(module):
                found.append(f"{module} imports {target}")
    return found


def test_every_module_sits_in_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if module != "bwplugin.__init__":
            assert layer_of(module) >= 0, f"{module} is in no layer ({', '.join(LAYERS)})"


def test_imports_only_run_downward() -> None:
    assert upward_imports() == []


def test_the_layout_check_catches_upward_imports(tmp_path: Path) -> None:
    """Not vacuous: in a copy of the package's shape, a datapath module importing a
    command (relatively) and the contract importing the node (absolutely) are caught."""
    fake = tmp_path / "bwplugin"
    for sub, text in (
        ("datapath/tc.py", "from ..commands import add\nfrom .netlink import Netlink\n"),
        ("cni/config.py", "import bwplugin.node.agent\n"),
        ("commands/add.py", "from ..datapath import tc\n"),
    ):
        (fake / sub).parent.mkdir(parents=True, exist_ok=True)
        (fake / sub).write_text(text)
    assert sorted(upward_imports(fake)) == [
        "bwplugin.cni.config imports bwplugin.node.agent",
        "bwplugin.datapath.tc imports bwplugin.commands",
    ]


def test_no_lab_emulation_or_fault_hooks_in_the_product() -> None:
    names = {p.stem for p in PACKAGE.rglob("*.py")}
    assert not names & {"lab", "libcni", "measure", "demo", "faults"}
    for path in PACKAGE.rglob("*.py"):
        assert "BWPLUGIN_FAULT" not in path.read_text(), path
