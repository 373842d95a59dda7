"""The layering rules of design.md, checked: every import of every module under mproxy/.

Imports are read with ``ast`` (module level, inside functions, under
``if TYPE_CHECKING:``; relative imports resolved), never executed. A name
given as a string to ``importlib`` (the backend registry) is not an import.

The rules are the table :data:`RULES`; a module may match several. Module
names are matched by prefix on dotted components, so ``mproxy.backends.momento``
names both a module ``momento.py`` and a package ``momento/`` with everything
inside it.

Exits: only ``mproxy/cli.py`` ends the process (``sys.exit``, ``exit()``,
``quit()``, ``os._exit``, ``raise SystemExit``). The one exception is
``mproxy/momento_local/__main__.py``: it is the entry point of a separate
program (``mproxy-momento-local``, its own process), so it plays the role of
cli.py for that program.
"""

from __future__ import annotations

import ast
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "mproxy"

STDLIB = "<stdlib>"

#: Modules directly under mproxy/backends/ that are shared by every backend, not a backend.
SHARED_BACKEND_MODULES = frozenset({"__init__", "base", "counters"})

#: Modules allowed to end the process (see the module doc).
EXIT_ALLOWED = frozenset({"mproxy.cli", "mproxy.momento_local.__main__"})

#: (importer, imported) pairs that break a rule today and are being fixed by another change.
#: The test fails when one of them no longer occurs, so that the entry is removed with the fix.
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Rule:
    """``who`` (module prefixes) may import only ``only`` (if given) and never ``never``.

    ``STDLIB`` in ``only`` stands for every standard-library module; ``unless``
    lists prefixes exempt from ``never``; ``exempt`` lists prefixes of
    importers the rule does not apply to.
    """

    who: tuple[str, ...]
    why: str
    only: tuple[str, ...] = ()
    never: tuple[str, ...] = ()
    unless: tuple[str, ...] = ()
    exempt: tuple[str, ...] = ()


SDK = ("momento", "momento_wire_types", "grpc")

RULES: tuple[Rule, ...] = (
    Rule(
        ("mproxy.protocol",),
        "protocol/ is sans-IO and imports only the standard library",
        only=(STDLIB, "mproxy.protocol"),
    ),
    Rule(
        ("mproxy.config",),
        "config/ imports only the standard library (and the limits of protocol/commands.py, "
        "and tls.py, which checks the TLS files at load)",
        only=(STDLIB, "mproxy.config", "mproxy.protocol.commands", "mproxy.tls"),
    ),
    Rule(
        ("mproxy.tls",),
        "tls.py (the TLS settings as a context) imports only the standard library: config/ uses it",
        only=(STDLIB,),
    ),
    Rule(
        ("mproxy.backends",),
        "backends know nothing of the wire format, servers, stats, audit or config; "
        "of protocol/ they share only the vocabulary of protocol/commands.py",
        never=(
            "mproxy.dispatch",
            "mproxy.server",
            "mproxy.admin",
            "mproxy.app",
            "mproxy.cli",
            "mproxy.stats",
            "mproxy.audit",
            "mproxy.config",
            "mproxy.protocol",
            "gevent.server",
            "gevent.pywsgi",
        ),
        unless=("mproxy.protocol.commands",),
    ),
    Rule(
        ("mproxy",),
        "only the Momento backend talks to the Momento SDK and gRPC "
        "(and momento_local, the Momento-compatible server in its own process)",
        never=SDK,
        exempt=("mproxy.backends.momento", "mproxy.momento_local"),
    ),
    Rule(
        ("mproxy.momento_local",),
        "momento_local runs as its own, un-patched process: nothing of mproxy outside it, no gevent",
        never=("mproxy", "gevent"),
        unless=("mproxy.momento_local",),
    ),
    Rule(
        ("mproxy.dispatch",),
        "dispatch has no sockets and does not wire the process",
        never=("mproxy.server", "mproxy.admin", "mproxy.app", "mproxy.cli"),
    ),
    Rule(
        ("mproxy.server",),
        "the connection loop knows dispatch, not the backends behind it nor the process",
        never=("mproxy.app", "mproxy.cli", "mproxy.admin", "mproxy.backends"),
        unless=("mproxy.backends.base",),
    ),
    Rule(
        ("mproxy",),
        "only the entry points import the process wiring (cli.py; app.py and its supervisor "
        "and worker, workers.py and worker.py)",
        never=("mproxy.cli", "mproxy.app", "mproxy.worker", "mproxy.workers"),
        exempt=("mproxy.cli", "mproxy.__main__", "mproxy.worker", "mproxy.workers"),
    ),
    Rule(
        ("mproxy.workers",),
        "the supervisor creates no backend and never loads the Momento SDK or gRPC "
        "(its workers are started afresh, and load them themselves); it starts the "
        "embedded Momento server (stdlib only) its workers share",
        never=(*SDK, "mproxy.backends", "mproxy.dispatch"),
        unless=("mproxy.backends.momento.embedded",),
    ),
    Rule(
        ("mproxy.__init__",),
        "importing mproxy must stay cheap (cli.py patches gevent first)",
        only=(STDLIB,),
    ),
)


# -- the checker -------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    module: str  # dotted name of what is imported (a module of the tree when one exists)
    line: int


def module_name(path: Path, root: Path) -> str:
    """``root/protocol/parser.py`` -> ``mproxy.protocol.parser`` (``root`` is the package dir)."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _known_modules(root: Path) -> set[str]:
    names = {module_name(p, root) for p in root.rglob("*.py")}
    return names | {n.removesuffix(".__init__") for n in names if n.endswith(".__init__")}


def imports_of(path: Path, root: Path, known: set[str] | None = None) -> list[Import]:
    """Every import in the file at ``path``, relative ones resolved.

    ``from X import Y`` counts as importing ``X.Y`` when that is a module of the
    tree, else as importing ``X``.
    """
    known = _known_modules(root) if known is None else known
    name = module_name(path, root)
    package = name.removesuffix(".__init__") if _is_package(path) else name.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base_parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(Import(sub if sub in known else base, node.lineno))
    return found


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    """``name`` is one of ``prefixes`` or inside one (dotted components, not characters)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_stdlib(name: str) -> bool:
    return name.partition(".")[0] in sys.stdlib_module_names


def _backend_of(name: str) -> str | None:
    """The backend a module belongs to: ``mproxy.backends.momento.x`` and
    ``mproxy.backends.momento_codec`` -> ``momento``; None for shared modules."""
    parts = name.split(".")
    if len(parts) < 3 or parts[:2] != ["mproxy", "backends"] or parts[2] in SHARED_BACKEND_MODULES:
        return None
    return parts[2].partition("_")[0]


def _allowed(rule: Rule, imported: str) -> bool:
    if rule.only:
        ok = any(p == STDLIB and _is_stdlib(imported) or p != STDLIB and _under(imported, (p,)) for p in rule.only)
        if not ok:
            return False
    return not (_under(imported, rule.never) and not _under(imported, rule.unless))


def _exit_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """Places that end the process: sys.exit(), exit(), quit(), os._exit(), raise SystemExit."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                dotted = f"{func.value.id}.{func.attr}"
                if dotted in ("sys.exit", "os._exit"):
                    found.append((node.lineno, f"{dotted}()"))
            elif isinstance(func, ast.Name) and func.id in ("exit", "quit"):
                found.append((node.lineno, f"{func.id}()"))
        elif isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                found.append((node.lineno, "raise SystemExit"))
    return found


def violations(root: Path, rules: tuple[Rule, ...] = RULES) -> list[tuple[str, str, str]]:
    """``(importer, imported, message)`` for every broken rule under ``root``, sorted."""
    known = _known_modules(root)
    out: list[tuple[str, str, str]] = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        where = path.relative_to(root.parent)
        for imp in imports_of(path, root, known):
            for rule in rules:
                if _under(name, rule.who) and not _under(name, rule.exempt) and not _allowed(rule, imp.module):
                    out.append((name, imp.module, f"{where}:{imp.line}: {name} imports {imp.module}: {rule.why}"))
            mine, theirs = _backend_of(name), _backend_of(imp.module)
            if mine and theirs and mine != theirs:
                out.append(
                    (name, imp.module, f"{where}:{imp.line}: {name} imports {imp.module}: no backend imports another "
                     "backend (shared code goes to backends/base.py or backends/counters.py)")
                )
        if name not in EXIT_ALLOWED:
            for line, what in _exit_calls(ast.parse(path.read_text(encoding="utf-8"))):
                out.append((name, what, f"{where}:{line}: {name} calls {what}: only mproxy/cli.py ends the process"))
    return sorted(set(out))


# -- the tests ---------------------------------------------------------------------------


def test_the_package_keeps_its_layers() -> None:
    found = violations(ROOT)
    unexpected = [msg for importer, imported, msg in found if (importer, imported) not in KNOWN_VIOLATIONS]
    assert not unexpected, "layering broken (see ../shared/design.md):\n" + "\n".join(unexpected)
    fixed = KNOWN_VIOLATIONS - {(importer, imported) for importer, imported, _ in found}
    assert not fixed, f"fixed, remove from KNOWN_VIOLATIONS: {sorted(fixed)}"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "mproxy"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    return root


def test_the_checker_finds_each_kind_of_break(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "protocol/parser.py": """
                import json
                from ..backends.base import StoreMode
                def later():
                    import gevent
            """,
            "protocol/commands.py": "from . import errors\n",
            "protocol/errors.py": "",
            "backends/base.py": "from mproxy.protocol.commands import StoreMode\n",
            "backends/memory.py": "from mproxy.protocol import parser\nfrom mproxy.backends import base\n",
            "backends/momento/backend.py": "import grpc\nfrom .. import memory\nfrom . import codec\n",
            "backends/momento/codec.py": "from mproxy.backends import momento_extra\n",
            "backends/momento_extra.py": "",
            "momento_local/server.py": "import grpc\nfrom mproxy.backends import base\n",
            "dispatch.py": "from mproxy import server\n",
            "server.py": "from mproxy.backends.memory import MemoryBackend\nfrom mproxy.backends.base import Item\n",
            "config.py": "import tomllib\nfrom mproxy.protocol.commands import X\nfrom mproxy.protocol import parser\n",
            "stats.py": "import sys\ndef f():\n    sys.exit(1)\n",
            "audit.py": "def f():\n    raise SystemExit(2)\n",
            "cli.py": "import sys\nfrom mproxy import app\nsys.exit(0)\n",
            "app.py": "",
            "__init__.py": "import gevent\n",
        },
    )
    found = {(importer, imported) for importer, imported, _ in violations(root)}
    assert found == {
        ("mproxy.protocol.parser", "mproxy.backends.base"),
        ("mproxy.protocol.parser", "gevent"),
        ("mproxy.backends.memory", "mproxy.protocol.parser"),
        ("mproxy.backends.momento.backend", "mproxy.backends.memory"),
        ("mproxy.momento_local.server", "mproxy.backends.base"),
        ("mproxy.dispatch", "mproxy.server"),
        ("mproxy.server", "mproxy.backends.memory"),
        ("mproxy.config", "mproxy.protocol.parser"),
        ("mproxy.stats", "sys.exit()"),
        ("mproxy.audit", "raise SystemExit"),
        ("mproxy.__init__", "gevent"),
    }
    messages = "\n".join(msg for _, _, msg in violations(root))
    assert "mproxy/protocol/parser.py:3: mproxy.protocol.parser imports mproxy.backends.base: protocol/" in messages
    assert "no backend imports another backend" in messages


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import grpc\n", {("mproxy.stats", "grpc")}),
        ("from momento_wire_types import cacheclient_pb2\n", {("mproxy.stats", "momento_wire_types")}),
        ("def f():\n    exit()\n", {("mproxy.stats", "exit()")}),
        ("import os\nos._exit(1)\n", {("mproxy.stats", "os._exit()")}),
        ("from mproxy import cli\n", {("mproxy.stats", "mproxy.cli")}),
        ("import mproxy.app\n", {("mproxy.stats", "mproxy.app")}),
        ("import os\nfrom mproxy.backends import base\n", set()),
    ],
)
def test_the_checker_on_one_module(tmp_path: Path, source: str, expected: set[tuple[str, str]]) -> None:
    root = _tree(tmp_path, {"stats.py": source, "cli.py": "", "app.py": "", "backends/base.py": ""})
    assert {(importer, imported) for importer, imported, _ in violations(root)} == expected
