"""Authorization policies per destination service: frozen values, parsing, evaluation.

Istio's AuthorizationPolicy, simplified to one rule per policy::

    x-composemesh:
      policies:
        reviews:                        # the destination mesh service
          - name: only-frontend         # default: reviews[0]
            action: ALLOW               # ALLOW (default) or DENY
            from: [productpage]         # source mesh services; "*": any mesh identity;
                                        # left out: any source, unauthenticated ones too
            to:                         # left out: any request or connection
              - methods: [GET]          # AND within an item, OR across items
                paths: ["/reviews/*", "/health"]

Evaluation (``authorize``), as in Istio: if a DENY policy matches, deny; else if the
destination has ALLOW policies, allow only if one matches; else allow.

Paths are exact (``/health``), a prefix (``/reviews/*``), a suffix (``*.png``) or ``*`` (any).
They are matched against the request path normalized by ``normalize_path`` (query and
fragment cut, ``\\`` read as ``/``, unreserved percent-escapes decoded, slashes merged, dot
segments removed), so ``/public/../admin`` is ``/admin`` to every policy.

The proxy does not let the app see another path than the one a policy saw: ``request_path``
is what Envoy's ``normalize_path`` + ``merge_slashes`` + ``path_with_escaped_slashes_action``
do, once, and the proxy forwards its result. Escaped slashes and backslashes (``%2F``,
``%5C``, a raw ``\\``), which one app reads as a separator and another does not, are refused
(``REJECT_REQUEST``, the default), left encoded and never a separator (``KEEP_UNCHANGED``), or
decoded into ``/`` before normalizing (``UNESCAPE_AND_FORWARD``); a fragment or an encoded NUL
is refused whatever the action.

A TCP connection (no method, no path) carries no HTTP to match. Like Istio: a ``to`` item
with methods or paths never matches TCP in an ALLOW policy (the rule is too narrow to grant a
whole connection) and always matches TCP in a DENY policy (denying more, never less).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from composemesh.errors import ConfigError
from composemesh.model.settings import SECTION

POLICIES = f"{SECTION}.policies"
ACTIONS = ("ALLOW", "DENY")
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
ANY_IDENTITY = "*"
POLICY_KEYS = ("name", "action", "from", "to")
OPERATION_KEYS = ("methods", "paths")

Action = Literal["ALLOW", "DENY"]
# ``from`` naming a service of another compose project (on another host, sharing the root)
_OTHER_PROJECT = re.compile(r"[a-z0-9][a-z0-9_-]*/[A-Za-z0-9][A-Za-z0-9._-]*")

# What ``request_path`` does with escaped slashes and backslashes (Envoy's
# path_with_escaped_slashes_action, Istio's pathNormalization).
REJECT_REQUEST = "REJECT_REQUEST"  # answer 400 (the default)
KEEP_UNCHANGED = "KEEP_UNCHANGED"  # forwarded encoded (a raw backslash as %5C); never a separator
UNESCAPE_AND_FORWARD = "UNESCAPE_AND_FORWARD"  # decoded to "/", then normalized like the rest
ESCAPED_SLASHES_ACTIONS = (REJECT_REQUEST, KEEP_UNCHANGED, UNESCAPE_AND_FORWARD)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\[\]-]*")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_SLASHES = re.compile(r"/{2,}")
_ESCAPED_SLASH = re.compile(r"%(?:2[Ff]|5[Cc])")
_ENCODED_NUL = re.compile(r"%00")
# A path without any of these is its own normal form (the fast path of request_path).
_NOT_NORMAL = re.compile(r"[%\\#]|//|/\.(?:\.)?(?:/|$)")


@dataclass(frozen=True, slots=True)
class Operation:
    """One ``to`` item: every condition given must hold. Empty means any."""

    methods: frozenset[str] = frozenset()  # upper-case
    paths: tuple[str, ...] = ()  # patterns: /exact, /prefix*, *suffix, *

    def __post_init__(self) -> None:  # what its types cannot say (it travels in snapshots)
        unknown = sorted(self.methods - frozenset(METHODS))
        if unknown:
            raise ValueError(f"methods: {', '.join(map(repr, unknown))} is not one of "
                             f"{', '.join(METHODS)}")
        if not all(self.paths):
            raise ValueError("paths: a path pattern is empty")

    @property
    def needs_http(self) -> bool:
        return bool(self.methods or self.paths)


@dataclass(frozen=True, slots=True)
class Policy:
    """One authorization policy of a destination service."""

    name: str
    action: Action = "ALLOW"
    sources: frozenset[str] | None = None  # None: any source, unauthenticated included
    operations: tuple[Operation, ...] = ()  # empty: any request or connection

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must not be empty")


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    reason: str


ALLOWED_NO_POLICY = Verdict(True, "RBAC: allowed (no ALLOW policy)")
DENIED_NO_MATCH = Verdict(False, "RBAC: access denied (no ALLOW policy matched)")


# --------------------------------------------------------------------------- evaluation


def authorize(
    policies: Sequence[Policy],
    source_service: str | None,
    method: str | None,
    path: str | None,
) -> Verdict:
    """Allow or deny one request (HTTP) or connection (``method`` and ``path`` None).

    ``source_service`` is the peer's mesh service from its verified SPIFFE ID, or None for a
    plaintext (unauthenticated) peer.
    """
    if not policies:
        return ALLOWED_NO_POLICY
    http = method is not None or path is not None
    if method is not None:
        method = method.upper()
    if path is not None:
        path = normalize_path(path)
    has_allow = False
    for policy in policies:
        if policy.action == "DENY":
            if _matches(policy, source_service, http, method, path):
                return Verdict(False, f"RBAC: access denied (policy {policy.name})")
        else:
            has_allow = True
    if not has_allow:
        return ALLOWED_NO_POLICY
    for policy in policies:
        if policy.action == "ALLOW" and _matches(policy, source_service, http, method, path):
            return Verdict(True, f"RBAC: allowed (policy {policy.name})")
    return DENIED_NO_MATCH


def _matches(
    policy: Policy, source: str | None, http: bool, method: str | None, path: str | None
) -> bool:
    sources = policy.sources
    if sources is not None and (
        source is None or (source not in sources and ANY_IDENTITY not in sources)
    ):
        return False
    if not policy.operations:
        return True
    deny = policy.action == "DENY"
    for op in policy.operations:
        if not op.needs_http:
            return True
        if not http:
            if deny:
                return True  # fail closed: a DENY on HTTP conditions denies the TCP connection
            continue
        if op.methods and (method is None or method not in op.methods):
            continue
        if op.paths and (path is None or not any(path_matches(p, path) for p in op.paths)):
            continue
        return True
    return False


def path_matches(pattern: str, path: str) -> bool:
    """``*`` any; ``/a/*`` prefix ``/a/``; ``*.png`` suffix ``.png``; else exact."""
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return path.endswith(pattern[1:])
    return path == pattern


def normalize_path(path: str) -> str:
    """The path policies see: no query or fragment, ``\\`` as ``/``, unreserved escapes
    decoded, slashes merged, dot segments removed (RFC 3986 5.2.4); always starts with ``/``.
    """
    for sep in ("?", "#"):
        cut = path.find(sep)
        if cut >= 0:
            path = path[:cut]
    if "\\" in path:
        path = path.replace("\\", "/")
    if "%" in path:
        path = _PERCENT.sub(_unescape_unreserved, path)
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if not path.startswith("/"):
        path = "/" + path
    if "/." not in path:
        return path
    out: list[str] = []
    segments = path[1:].split("/")
    for seg in segments:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    trailing = segments[-1] in (".", "..")
    return "/" + "/".join(out) + ("/" if trailing and out else "")


def request_path(path: str, escaped_slashes: str = REJECT_REQUEST) -> str | None:
    """The path a request is authorized with and forwarded to the app with; None: refuse it
    (400). ``path`` is the request target's path, its query cut off.

    The result is ``normalize_path``'s, after the ``escaped_slashes`` action (see the module's
    doc); a fragment (``#``) or an encoded NUL (``%00``) is always refused. Normalizing the
    result again changes nothing, so the app and every policy read the same path.
    """
    if path[:1] == "/" and _NOT_NORMAL.search(path) is None:
        return path
    if "#" in path or _ENCODED_NUL.search(path) is not None:
        return None
    if "\\" in path or _ESCAPED_SLASH.search(path) is not None:
        if escaped_slashes == KEEP_UNCHANGED:
            path = path.replace("\\", "%5C")
        elif escaped_slashes == UNESCAPE_AND_FORWARD:
            path = _ESCAPED_SLASH.sub("/", path).replace("\\", "/")
        else:
            return None
    return normalize_path(path)


def _unescape_unreserved(m: re.Match[str]) -> str:
    ch = chr(int(m.group(1), 16))
    return ch if ch in _UNRESERVED else m.group(0).upper()


# --------------------------------------------------------------------------- parsing


def parse_policies(
    section: object, known_services: Collection[str]
) -> dict[str, tuple[Policy, ...]]:
    """``x-composemesh: policies:`` -> destination service -> its policies, in file order.

    Raises ConfigError naming the field (``x-composemesh.policies.reviews[0].from[1]``) for
    an unknown destination or source service, a bad action or method, a bad path pattern,
    an unknown key, an empty list, or two policies of one destination with the same name.
    """
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError(
            "must be a mapping of destination service to its policies", field=POLICIES
        )
    known = set(known_services)
    result: dict[str, tuple[Policy, ...]] = {}
    for dest, items in section.items():
        where = f"{POLICIES}.{dest}"
        if dest not in known:
            raise ConfigError(
                f"{dest!r} is not a mesh service (the mesh services are {_names(known)})",
                field=where,
            )
        if not isinstance(items, list) or not items:
            raise ConfigError("must be a non-empty list of policies", field=where)
        policies: list[Policy] = []
        for i, item in enumerate(items):
            policy = _policy(item, f"{where}[{i}]", f"{dest}[{i}]", known)
            if any(p.name == policy.name for p in policies):
                raise ConfigError(
                    f"{policy.name!r} names two policies of {dest!r}", field=f"{where}[{i}].name"
                )
            policies.append(policy)
        result[str(dest)] = tuple(policies)
    return result


def _policy(item: object, where: str, default_name: str, known: set[str]) -> Policy:
    if not isinstance(item, Mapping):
        raise ConfigError("must be a mapping with name, action, from, to", field=where)
    for key in item:
        if key not in POLICY_KEYS:
            raise ConfigError(
                f"unknown key {key!r}; the keys are {', '.join(POLICY_KEYS)}", field=where
            )
    name = item.get("name", default_name)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"{name!r} is not a policy name (letters, digits, '.', '-', '_')",
            field=f"{where}.name",
        )
    action = item.get("action", "ALLOW")
    if not isinstance(action, str) or action.upper() not in ACTIONS:
        raise ConfigError(f"{action!r} is not one of {', '.join(ACTIONS)}", field=f"{where}.action")
    sources = None
    if "from" in item:
        sources = frozenset(_sources(item["from"], f"{where}.from", known))
    operations: tuple[Operation, ...] = ()
    if "to" in item:
        to = _list(item["to"], f"{where}.to", "a non-empty list of {methods, paths} conditions")
        operations = tuple(_operation(op, f"{where}.to[{i}]") for i, op in enumerate(to))
    return Policy(
        name=name,
        action=action.upper(),  # type: ignore[arg-type]  # checked above
        sources=sources,
        operations=operations,
    )


def _sources(value: object, where: str, known: set[str]) -> list[str]:
    items = _list(value, where, 'a non-empty list of mesh services or "*"')
    for i, source in enumerate(items):
        if source == ANY_IDENTITY:
            continue
        if isinstance(source, str) and _OTHER_PROJECT.fullmatch(source):
            continue  # <project>/<service>: a caller of another project (host), same root
        if not isinstance(source, str) or source not in known:
            raise ConfigError(
                f"{source!r} is not a mesh identity (the mesh services are {_names(known)}, "
                f'or "*" for any of them)',
                field=f"{where}[{i}]",
            )
    return items


def _operation(value: object, where: str) -> Operation:
    if not isinstance(value, Mapping) or not value:
        raise ConfigError("must be a mapping with methods and/or paths", field=where)
    for key in value:
        if key not in OPERATION_KEYS:
            raise ConfigError(f"unknown key {key!r}; the keys are methods, paths", field=where)
    methods: set[str] = set()
    if "methods" in value:
        mw = f"{where}.methods"
        for i, method in enumerate(_list(value["methods"], mw, "a non-empty list of methods")):
            if not isinstance(method, str) or method.upper() not in METHODS:
                raise ConfigError(
                    f"{method!r} is not an HTTP method ({', '.join(METHODS)})", field=f"{mw}[{i}]"
                )
            methods.add(method.upper())
    paths: list[str] = []
    if "paths" in value:
        pw = f"{where}.paths"
        for i, pattern in enumerate(_list(value["paths"], pw, "a non-empty list of paths")):
            paths.append(_path_pattern(pattern, f"{pw}[{i}]"))
    return Operation(methods=frozenset(methods), paths=tuple(paths))


def _path_pattern(value: object, where: str) -> str:
    hint = "a path: /exact, /prefix/*, *suffix or *"
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ConfigError(f"{value!r} is not {hint}", field=where)
    if value == "*":
        return value
    inner = value[1:] if value.startswith("*") else value[:-1] if value.endswith("*") else value
    if "*" in inner:
        raise ConfigError(f"{value!r}: '*' may only start or end a path ({hint})", field=where)
    if not value.startswith(("*", "/")):
        raise ConfigError(f"{value!r} does not start with '/' ({hint})", field=where)
    if not value.startswith("*") and normalize_path(inner) != inner:
        raise ConfigError(
            f"{value!r} never matches: requests are matched on the normalized path "
            f"({normalize_path(inner)!r})",
            field=where,
        )
    return value


def _list(value: object, where: str, what: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"must be {what}", field=where)
    return value


def _names(known: Collection[str]) -> str:
    return ", ".join(sorted(known)) if known else "none: no service is in the mesh"
