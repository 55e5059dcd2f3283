"""A griffe extension for the docs build (``mkdocs.yml`` loads it; it is not part of the package).

The package's docstrings use Sphinx roles (``:class:`~memgpt.MemGPTModel```, ``:func:`write```,
``:mod:`memgpt.memory.reversible```); mkdocstrings renders Markdown. Each role becomes a
cross-reference that autorefs resolves (``[`MemGPTModel`][memgpt.models.model.MemGPTModel]``), so
the name links to its entry in the API reference.

Names are resolved as Sphinx does: absolute (``memgpt.x.y``), then in the scope of the documented
object (its class's members, its module's imports), then as the one object of that name in the
package. A role that names nothing is a broken reference: it is logged as a warning, so
``mkdocs build --strict`` fails. A role that names a real object the reference does not render
(a private helper) is shown as code, without a link.

Options (from ``mkdocs.yml``): ``members``, the modules the reference renders with their
exported members; ``modules``, those it renders by their docstring only.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|attr|data|obj|exc|const):`(~?)([^`<>]+?)`")
_logger = griffe.get_logger("sphinx_roles")
_ERRORS = (KeyError, ValueError, AttributeError, griffe.AliasResolutionError, griffe.CyclicAliasError)


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _documented(obj: griffe.Object | griffe.Alias) -> bool:
    return obj.docstring is not None and bool(obj.docstring.value.strip())


def _blocks(text: str) -> str:
    """RST layout to Markdown: a top-level line followed by a more indented block (``Fields`` and
    its rows, ``...as the tests do::`` and its code) gets the blank line that makes the block a
    preformatted one, and a closing ``::`` becomes ``:``."""
    lines = text.split("\n")
    out: list[str] = []
    in_block = False
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if in_block and line.startswith("    ") and line.strip():
            out.append(line.replace("``", ""))  # preformatted: RST's inline-code marks would show
            continue
        in_block = False
        starts_block = line.strip() and not line.startswith(" ") and nxt.startswith("    ") and nxt.strip()
        if line.strip() == "::":
            line = ""
        elif line.rstrip().endswith("::") and (starts_block or not nxt.strip()):
            line = line.rstrip()[:-1]
        out.append(line)
        if starts_block and not line.lstrip().startswith(("- ", "* ")):
            out.append("")
            in_block = True
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    def __init__(self, members: list[str] | None = None, modules: list[str] | None = None) -> None:
        self.members = list(members or [])
        self.modules = list(modules or [])

    # ------------------------------------------------------------------ what the reference renders
    def _lookup(self, pkg: griffe.Module, path: str) -> griffe.Object | griffe.Alias:
        if path == pkg.path:
            return pkg
        if not path.startswith(pkg.path + "."):
            raise KeyError(path)
        return pkg[path[len(pkg.path) + 1 :]]

    def _target(self, module: griffe.Module, name: str) -> griffe.Object | griffe.Alias:
        """The object a module exports as ``name`` (Python's view: an import in a package's
        ``__init__`` shadows the submodule of the same name, as ``memgpt.memory.read``)."""
        member = module.members[name]
        if member.is_module and name in module.imports:
            return self._lookup(module.package, module.imports[name])
        return member.final_target if member.is_alias else member

    def _rendered(self, pkg: griffe.Module) -> set[str]:
        rendered = set(self.modules)
        for path in self.members:
            module = self._lookup(pkg, path)
            rendered.add(module.path)
            for name in module.exports or []:
                try:
                    obj = self._target(module, name)
                except _ERRORS:
                    continue
                if not _documented(obj):
                    continue
                rendered.add(obj.path)
                if obj.is_class:
                    for member in obj.members.values():
                        if not member.name.startswith("_") and not member.is_alias and _documented(member):
                            rendered.add(member.path)
        return rendered

    # ------------------------------------------------------------------ the rewrite
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != "memgpt":
            return
        rendered = self._rendered(pkg)
        objects = list(_walk(pkg))
        by_name: dict[str, list[str]] = defaultdict(list)
        for obj in objects:
            by_name[obj.name].append(obj.path)
        for obj in objects:
            if obj.path not in rendered or obj.docstring is None or ":`" not in obj.docstring.value:
                continue  # only what the reference shows: the applications' docstrings are not rendered

            def link(match: re.Match, obj: griffe.Object = obj) -> str:
                _role, short, name = match.groups()
                name = name.strip()
                shown = name.rsplit(".", 1)[-1] if short else name
                path = self._resolve(pkg, obj, name, by_name)
                if path is None:
                    _logger.warning(f"{obj.path}: the reference {match.group(0)} names nothing in the package")
                    return f"`{shown}`"
                return f"[`{shown}`][{path}]" if path in rendered else f"`{shown}`"

            obj.docstring.value = _ROLE.sub(link, obj.docstring.value)
        for obj in objects:
            if obj.path in rendered and obj.docstring is not None:
                obj.docstring.value = _blocks(obj.docstring.value)

    def _canonical(self, pkg: griffe.Module, path: str) -> str | None:
        try:
            obj = self._lookup(pkg, path)
            parent_path, _, name = path.rpartition(".")
            parent = self._lookup(pkg, parent_path) if parent_path else None
            if parent is not None and parent.is_module and obj.is_module and name in parent.imports:
                obj = self._lookup(pkg, parent.imports[name])  # the import shadows the submodule
            return (obj.final_target if obj.is_alias else obj).path
        except _ERRORS:
            return None

    def _resolve(self, pkg: griffe.Module, obj: griffe.Object, name: str, by_name: dict[str, list[str]]) -> str | None:
        if name == pkg.name or name.startswith(pkg.name + "."):
            return self._canonical(pkg, name)
        head, _, rest = name.partition(".")
        scope: griffe.Object | None = obj
        while scope is not None:
            if head in scope.members:
                path = f"{scope.members[head].path}.{rest}" if rest else scope.members[head].path
                return self._canonical(pkg, path)
            if scope.is_module and head in scope.imports:
                path = f"{scope.imports[head]}.{rest}" if rest else scope.imports[head]
                return self._canonical(pkg, path)
            scope = scope.parent
        candidates = [c for c in by_name.get(name.rsplit(".", 1)[-1], []) if c == name or c.endswith("." + name)]
        return self._canonical(pkg, candidates[0]) if len(candidates) == 1 else None
