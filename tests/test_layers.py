"""The layers stay layers: what each package may import, no two modules importing each other, and an engine
that works where gRPC, protobuf and Ray are not installed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["paramserver", "workers"]

# package prefix -> imports it must never make (anywhere in a module, lazy imports included)
FORBIDDEN = {
    "paramserver.core": ["grpc", "google.protobuf", "ray", "paramserver.wire", "paramserver.service", "paramserver.hosting", "workers"],
    "paramserver.dataplane": ["grpc", "google.protobuf", "ray", "paramserver.wire", "paramserver.service", "paramserver.hosting", "workers"],
    "paramserver.checkpoint": ["grpc", "google.protobuf", "ray", "paramserver.service", "paramserver.hosting", "workers"],
    "paramserver.wire": ["ray", "paramserver.service", "paramserver.hosting", "workers"],
    "paramserver.service": ["ray", "paramserver.hosting", "workers"],
    "paramserver.hosting": ["workers"],
    # the client side speaks the wire; it never reaches into a server
    "workers.client": ["paramserver.service", "paramserver.hosting"],
    "workers.buffers": ["paramserver.service", "paramserver.hosting"],
    "workers.remote_optimizer": ["paramserver.service", "paramserver.hosting"],
    "workers.shared_memory": ["paramserver.service", "paramserver.hosting"],
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "proto" in path.relative_to(ROOT).parts[:3] and path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue  # generated code
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, at the top or inside functions; ``from a import b`` counts as a.b when
    a.b is a module of ours."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


@pytest.mark.parametrize("prefix", list(FORBIDDEN))
def test_layer_imports(prefix):
    bad = []
    for name, imported in GRAPH.items():
        if name == prefix or name.startswith(prefix + "."):
            bad += [f"{name} imports {m}" for m in imported for f in FORBIDDEN[prefix] if m == f or m.startswith(f + ".")]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    ours = {n: {m for m in imported if m in MODULES and m != n} for n, imported in GRAPH.items()}
    # a package's __init__ re-exporting its modules is not a cycle of two modules importing each other
    edges = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in ours.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(edges[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "modules import each other:\n" + "\n".join(cycles)


def _python(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_import_paramserver_does_not_load_grpc_or_ray():
    _python("import sys, paramserver; bad = {'grpc', 'ray', 'google.protobuf'} & set(sys.modules); assert not bad, bad")


def test_the_engine_works_where_grpc_protobuf_and_ray_are_missing():
    _python(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('grpc', 'ray') or name.startswith('google.protobuf'):\n"
        "            raise ImportError(f'{name} is not installed here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, paramserver as ps\n"
        "model = torch.nn.Linear(4, 2)\n"
        "engine = ps.StepEngine(model.named_parameters(), 'Adam', lr=0.1, num_shards=2, config=ps.JobConfig(num_workers=2))\n"
        "grads = [torch.ones_like(p) for p in model.parameters()]\n"
        "engine.push(0, 0, grads); result = engine.push(1, 0, grads)\n"
        "assert result is not None and result.step == 0, result\n"
        "try:\n"
        "    ps.serve_local\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('the service loaded without grpc')\n"
    )
