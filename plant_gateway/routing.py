"""Route patterns, shared by the steps that pick routes: routing, authentication, tenant binding.

A pattern is ``[!][METHOD[|METHOD…] ]PATH``. ``PATH`` matches exactly (one trailing slash
tolerated), as an anchored prefix when it ends in ``*`` (``/a/*`` also matches ``/a``), and a
segment that is just ``*`` stands for exactly one path segment
(``/api/v1/hired-agents/*/finalize``). A method list limits the pattern to those methods; a
leading ``!`` excludes what it matches from the whole set. Nothing ever matches by suffix
(docs/MIGRATING.md, defects: any path ending in ``/docs`` skipped authentication on the
deployed gateway).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_METHOD = re.compile(r"^[A-Z]+$")


@dataclass(frozen=True, slots=True)
class RoutePattern:
    path: str
    methods: frozenset[str] | None = None  # None: every method
    excluded: bool = False

    @property
    def simple(self) -> bool:
        """No method list, no exclusion, no one-segment wildcard: matched without a regex."""
        inner = self.path[:-1] if self.path.endswith("*") else self.path
        return self.methods is None and not self.excluded and "*" not in inner

    def regex(self) -> re.Pattern[str]:
        path, tail = self.path, "/?"
        if path.endswith("/*"):
            path, tail = path[:-2], "(?:/.*)?"
        elif path.endswith("*"):
            path, tail = path[:-1], ".*"
        body = "/".join("[^/]+" if seg == "*" else re.escape(seg) for seg in path.split("/"))
        return re.compile(f"^{body}{tail}$")


def parse(pattern: str) -> RoutePattern:
    """``"!POST|PUT /a/*/b"`` → RoutePattern; ValueError names what is wrong."""
    text = pattern.strip()
    excluded = text.startswith("!")
    text = text.removeprefix("!").strip()
    methods: frozenset[str] | None = None
    if " " in text:
        listed, text = text.split(None, 1)
        names = [m.strip().upper() for m in listed.split("|") if m.strip()]
        if not names or not all(_METHOD.match(m) for m in names):
            raise ValueError(f"route {pattern!r}: bad method list {listed!r}")
        methods = frozenset(names)
        text = text.strip()
    if not text.startswith("/") or " " in text:
        raise ValueError(f"route {pattern!r}: the path must start with '/' and have no spaces")
    if "*" in text.rstrip("*") and any(
        "*" in seg and seg != "*" for seg in text.rstrip("*").split("/")
    ):
        raise ValueError(f"route {pattern!r}: '*' must be a whole segment or the last character")
    return RoutePattern(text, methods, excluded)


class RouteSet:
    """A set of patterns, precompiled: exact paths and anchored prefixes are a set lookup and
    one ``startswith``; only patterns with methods, wildcards or exclusions use a regex."""

    __slots__ = ("exact", "prefixes", "patterned", "exclusions")

    def __init__(self, patterns: Iterable[str | RoutePattern]) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        patterned: list[tuple[frozenset[str] | None, re.Pattern[str]]] = []
        exclusions: list[tuple[frozenset[str] | None, re.Pattern[str]]] = []
        for item in patterns:
            pattern = parse(item) if isinstance(item, str) else item
            if pattern.excluded:
                exclusions.append((pattern.methods, pattern.regex()))
            elif not pattern.simple:
                patterned.append((pattern.methods, pattern.regex()))
            elif not pattern.path.endswith("*"):
                exact.add(pattern.path)
            else:
                base = pattern.path[:-1]
                prefixes.append(base)
                if base.endswith("/"):
                    exact.add(base[:-1])
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.patterned = tuple(patterned)
        self.exclusions = tuple(exclusions)

    def __call__(self, path: str, method: str = "GET") -> bool:
        if self.exclusions and _any_match(self.exclusions, method, path):
            return False
        if path in self.exact or path.startswith(self.prefixes):
            return True
        if len(path) > 1 and path[-1] == "/" and path[:-1] in self.exact:
            return True
        return bool(self.patterned) and _any_match(self.patterned, method, path)

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes or self.patterned)


def _any_match(
    entries: tuple[tuple[frozenset[str] | None, re.Pattern[str]], ...], method: str, path: str
) -> bool:
    # a HEAD is a GET without the body: it matches what a GET matches (tenant binding included)
    return any(
        (methods is None or method in methods or (method == "HEAD" and "GET" in methods))
        and regex.match(path)
        for methods, regex in entries
    )


def match_route(pattern: str, path: str, method: str = "GET") -> bool:
    """One pattern against one path (the syntax of the module docstring)."""
    return RouteSet([pattern])(path, method)


def for_methods(path: str, methods: Iterable[str]) -> RoutePattern:
    """A plain path (no ``!``, no method prefix) limited to ``methods``."""
    return RoutePattern(path, frozenset(m.upper() for m in methods))
