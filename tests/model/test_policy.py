"""Authorization policies: parsing errors named by field, Istio's evaluation order, the codec."""

from __future__ import annotations

import json
import posixpath
from typing import Any
from urllib.parse import unquote

import pytest

from composemesh.errors import ConfigError
from composemesh.model.policy import (
    KEEP_UNCHANGED,
    REJECT_REQUEST,
    UNESCAPE_AND_FORWARD,
    Operation,
    Policy,
    Verdict,
    authorize,
    normalize_path,
    parse_policies,
    path_matches,
    request_path,
)
from composemesh.model.wire import ContractError, convert, decode, encode

SERVICES = ("productpage", "reviews", "ratings", "details")
P = "x-composemesh.policies"


def error(section: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_policies(section, SERVICES)
    return info.value


# --------------------------------------------------------------------------- parsing


def test_parse_full_example() -> None:
    section = {
        "reviews": [
            {
                "name": "only-frontend",
                "action": "ALLOW",
                "from": ["productpage"],
                "to": [{"methods": ["GET", "head"], "paths": ["/reviews/*", "/health"]}],
            },
            {"action": "deny", "from": ["*"], "to": [{"paths": ["*.bak"]}]},
        ],
        "ratings": [{"name": "anyone"}],
    }
    parsed = parse_policies(section, SERVICES)
    assert parsed == {
        "reviews": (
            Policy(
                name="only-frontend",
                action="ALLOW",
                sources=frozenset({"productpage"}),
                operations=(
                    Operation(methods=frozenset({"GET", "HEAD"}), paths=("/reviews/*", "/health")),
                ),
            ),
            Policy(
                name="reviews[1]",
                action="DENY",
                sources=frozenset({"*"}),
                operations=(Operation(paths=("*.bak",)),),
            ),
        ),
        "ratings": (Policy(name="anyone"),),
    }
    assert parse_policies(None, SERVICES) == {}
    assert parse_policies({}, SERVICES) == {}


@pytest.mark.parametrize(
    ("section", "field", "message"),
    [
        ([], P, "must be a mapping of destination service"),
        (
            {"nope": [{}]},
            f"{P}.nope",
            "'nope' is not a mesh service "
            "(the mesh services are details, productpage, ratings, reviews)",
        ),
        ({"reviews": []}, f"{P}.reviews", "must be a non-empty list of policies"),
        ({"reviews": {"name": "x"}}, f"{P}.reviews", "must be a non-empty list of policies"),
        ({"reviews": ["x"]}, f"{P}.reviews[0]", "must be a mapping"),
        (
            {"reviews": [{"rules": []}]},
            f"{P}.reviews[0]",
            "unknown key 'rules'; the keys are name, action, from, to",
        ),
        ({"reviews": [{"name": ""}]}, f"{P}.reviews[0].name", "is not a policy name"),
        ({"reviews": [{"name": 3}]}, f"{P}.reviews[0].name", "is not a policy name"),
        (
            {"reviews": [{"name": "a"}, {"name": "a"}]},
            f"{P}.reviews[1].name",
            "'a' names two policies of 'reviews'",
        ),
        (
            {"reviews": [{"action": "AUDIT"}]},
            f"{P}.reviews[0].action",
            "'AUDIT' is not one of ALLOW, DENY",
        ),
        ({"reviews": [{"action": None}]}, f"{P}.reviews[0].action", "is not one of ALLOW, DENY"),
        (
            {"reviews": [{"from": []}]},
            f"{P}.reviews[0].from",
            'must be a non-empty list of mesh services or "*"',
        ),
        (
            {"reviews": [{"from": "productpage"}]},
            f"{P}.reviews[0].from",
            "must be a non-empty list",
        ),
        (
            {"reviews": [{"from": ["productpage", "hacker"]}]},
            f"{P}.reviews[0].from[1]",
            "'hacker' is not a mesh identity (the mesh services are details, productpage, "
            'ratings, reviews, or "*" for any of them)',
        ),
        ({"reviews": [{"from": [None]}]}, f"{P}.reviews[0].from[0]", "is not a mesh identity"),
        ({"reviews": [{"to": []}]}, f"{P}.reviews[0].to", "must be a non-empty list"),
        (
            {"reviews": [{"to": [{}]}]},
            f"{P}.reviews[0].to[0]",
            "must be a mapping with methods and/or paths",
        ),
        (
            {"reviews": [{"to": [{"ports": [80]}]}]},
            f"{P}.reviews[0].to[0]",
            "unknown key 'ports'; the keys are methods, paths",
        ),
        (
            {"reviews": [{"to": [{"methods": []}]}]},
            f"{P}.reviews[0].to[0].methods",
            "must be a non-empty list of methods",
        ),
        (
            {"reviews": [{"to": [{"methods": ["GET", "FETCH"]}]}]},
            f"{P}.reviews[0].to[0].methods[1]",
            "'FETCH' is not an HTTP method",
        ),
        (
            {"reviews": [{"to": [{"paths": []}]}]},
            f"{P}.reviews[0].to[0].paths",
            "must be a non-empty list of paths",
        ),
        (
            {"reviews": [{"to": [{"paths": [""]}]}]},
            f"{P}.reviews[0].to[0].paths[0]",
            "is not a path",
        ),
        (
            {"reviews": [{"to": [{"paths": ["/a/*/b"]}]}]},
            f"{P}.reviews[0].to[0].paths[0]",
            "'*' may only start or end a path",
        ),
        (
            {"reviews": [{"to": [{"paths": ["*a*"]}]}]},
            f"{P}.reviews[0].to[0].paths[0]",
            "'*' may only start or end",
        ),
        (
            {"reviews": [{"to": [{"paths": ["reviews"]}]}]},
            f"{P}.reviews[0].to[0].paths[0]",
            "does not start with '/'",
        ),
        (
            {"reviews": [{"to": [{"paths": ["/a b"]}]}]},
            f"{P}.reviews[0].to[0].paths[0]",
            "is not a path",
        ),
        (
            {"reviews": [{"to": [{"paths": ["/a/../b"]}]}]},
            f"{P}.reviews[0].to[0].paths[0]",
            "never matches: requests are matched on the normalized path ('/b')",
        ),
        (
            {"reviews": [{"to": [{"paths": ["/a?x=1"]}]}]},
            f"{P}.reviews[0].to[0].paths[0]",
            "never matches",
        ),
    ],
)
def test_parse_errors(section: object, field: str, message: str) -> None:
    err = error(section)
    assert err.field == field
    assert message in err.message


def test_no_mesh_services() -> None:
    with pytest.raises(ConfigError, match="none: no service is in the mesh"):
        parse_policies({"reviews": [{}]}, ())


# --------------------------------------------------------------------------- evaluation


def policies(*items: dict[str, Any]) -> tuple[Policy, ...]:
    return parse_policies({"reviews": list(items)}, SERVICES)["reviews"]


ONLY_FRONTEND = {
    "name": "only-frontend",
    "from": ["productpage"],
    "to": [{"methods": ["GET"], "paths": ["/reviews/*", "/health"]}],
}


def test_default_allow() -> None:
    for source in ("productpage", None):
        for method, path in (("POST", "/x"), (None, None)):
            d = authorize((), source, method, path)
            assert d == Verdict(True, "RBAC: allowed (no ALLOW policy)")


@pytest.mark.parametrize(
    ("source", "method", "path", "allowed"),
    [
        ("productpage", "GET", "/reviews/1", True),
        ("productpage", "get", "/reviews/1", True),  # methods compare upper-case
        ("productpage", "GET", "/health", True),
        ("productpage", "GET", "/health?verbose=1", True),  # the query is not the path
        ("productpage", "POST", "/reviews/1", False),  # AND within an item
        ("productpage", "GET", "/ratings/1", False),
        ("productpage", "GET", "/healthz", False),  # exact is exact
        ("productpage", "GET", "/reviews", False),  # the prefix is /reviews/
        ("ratings", "GET", "/reviews/1", False),  # another identity
        (None, "GET", "/reviews/1", False),  # plaintext: no identity
        ("productpage", None, None, False),  # TCP cannot satisfy an HTTP-only ALLOW rule
    ],
)
def test_allow_policy(
    source: str | None, method: str | None, path: str | None, allowed: bool
) -> None:
    d = authorize(policies(ONLY_FRONTEND), source, method, path)
    assert d.allowed is allowed
    assert d.reason == (
        "RBAC: allowed (policy only-frontend)"
        if allowed
        else "RBAC: access denied (no ALLOW policy matched)"
    )


def test_or_across_items_and_policies() -> None:
    ps = policies(
        {"name": "reads", "to": [{"methods": ["GET"]}, {"paths": ["/public/*"]}]},
        {"name": "ratings-any", "from": ["ratings"]},
    )
    assert authorize(ps, "details", "GET", "/x").reason == "RBAC: allowed (policy reads)"
    assert authorize(ps, "details", "POST", "/public/a").allowed
    assert not authorize(ps, "details", "POST", "/private").allowed
    assert authorize(ps, "ratings", "POST", "/private").reason == (
        "RBAC: allowed (policy ratings-any)"
    )
    assert authorize(ps, "ratings", None, None).allowed  # a TCP-capable rule
    assert not authorize(ps, "details", None, None).allowed


def test_from_semantics() -> None:
    omitted = policies({"name": "all", "to": [{"methods": ["GET"]}]})
    assert authorize(omitted, None, "GET", "/").allowed  # from left out: unauthenticated too
    star = policies({"name": "mesh", "from": ["*"]})
    assert authorize(star, "details", "GET", "/").allowed
    assert authorize(star, "reviews", None, None).allowed
    assert not authorize(star, None, "GET", "/").allowed  # "*" needs an identity


def test_deny_takes_precedence() -> None:
    ps = policies(
        {"name": "allow-all", "from": ["*"]},
        {"name": "no-delete", "action": "DENY", "to": [{"methods": ["DELETE"]}]},
        {"name": "no-ratings", "action": "DENY", "from": ["ratings"]},
    )
    assert authorize(ps, "productpage", "GET", "/").allowed
    d = authorize(ps, "productpage", "DELETE", "/reviews/1")
    assert d == Verdict(False, "RBAC: access denied (policy no-delete)")
    d = authorize(ps, "ratings", "GET", "/")
    assert d == Verdict(False, "RBAC: access denied (policy no-ratings)")
    assert not authorize(ps, None, "GET", "/").allowed  # no ALLOW matches without identity


def test_deny_only_means_allow_the_rest() -> None:
    ps = policies({"name": "no-admin", "action": "DENY", "to": [{"paths": ["/admin/*"]}]})
    assert authorize(ps, None, "GET", "/reviews").reason == "RBAC: allowed (no ALLOW policy)"
    assert not authorize(ps, "productpage", "GET", "/admin/users").allowed
    # the normalized path is what is matched: no way around the DENY by spelling
    for sneaky in (
        "/public/../admin/users",
        "//admin/users",
        "/./admin/x",
        "/%61dmin/x",
        "\\admin\\x",
    ):
        assert not authorize(ps, "productpage", "GET", sneaky).allowed, sneaky


def test_tcp_against_http_rules() -> None:
    # ALLOW with HTTP conditions never grants a TCP connection...
    allow = policies({"name": "gets", "from": ["productpage"], "to": [{"methods": ["GET"]}]})
    assert not authorize(allow, "productpage", None, None).allowed
    # ...but ALLOW without them does
    plain = policies({"name": "pp", "from": ["productpage"]})
    assert authorize(plain, "productpage", None, None).allowed
    # DENY with HTTP conditions denies the TCP connection (fail closed, like Istio)
    deny = policies(
        {"name": "allow-all"},
        {
            "name": "no-delete",
            "action": "DENY",
            "from": ["ratings"],
            "to": [{"methods": ["DELETE"]}],
        },
    )
    assert authorize(deny, "ratings", None, None) == Verdict(
        False, "RBAC: access denied (policy no-delete)"
    )
    assert authorize(deny, "productpage", None, None).allowed  # from still applies


def test_http_request_without_path_does_not_match_path_rules() -> None:
    ps = policies({"name": "p", "to": [{"paths": ["*"]}]})
    assert authorize(ps, "productpage", "GET", "/anything").allowed
    assert not authorize(ps, "productpage", "GET", None).allowed


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("*", "/", True),
        ("/health", "/health", True),
        ("/health", "/health/", False),
        ("/reviews/*", "/reviews/", True),
        ("/reviews/*", "/reviews/1/x", True),
        ("/reviews/*", "/reviewsX", False),
        ("/reviews*", "/reviewsX", True),
        ("*.png", "/img/a.png", True),
        ("*.png", "/img/a.png.bak", False),
        ("*/edit", "/doc/1/edit", True),
    ],
)
def test_path_patterns(pattern: str, path: str, matches: bool) -> None:
    assert path_matches(pattern, path) is matches


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/a/b", "/a/b"),
        ("", "/"),
        ("a", "/a"),
        ("/a?b=1#c", "/a"),
        ("/a#c?d", "/a"),
        ("/a//b///c", "/a/b/c"),
        ("/a/./b", "/a/b"),
        ("/a/b/../c", "/a/c"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/../../a", "/a"),
        ("/..", "/"),
        ("/a/.hidden", "/a/.hidden"),
        ("/a/..b", "/a/..b"),
        ("/%61%2E%2e/b", "/a../b"),
        ("/%2e%2e/b", "/b"),
        ("/a%2fb", "/a%2Fb"),  # an encoded slash stays encoded
        ("/a%20b", "/a%20b"),
        ("\\a\\..\\b", "/b"),
    ],
)
def test_normalize_path(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal


# --------------------------------------------------------------------------- the path forwarded

DENY_ADMIN = (Policy(name="no-admin", action="DENY", operations=(Operation(paths=("/admin/*",)),)),)
ALLOW_PUBLIC = (Policy(name="public", operations=(Operation(paths=("/public/*",)),)),)

# Request paths as they come on the wire (the query already cut off), and what the app
# receives under the default (REJECT_REQUEST): None is a 400.
ENCODINGS = [
    ("/admin%2Fsecret", None),
    ("/admin%2fsecret", None),
    ("/admin%5Csecret", None),
    ("/admin%5csecret", None),
    ("/admin\\secret", None),
    ("/admin/..\\x", None),
    ("/public/..%2Fadmin", None),
    ("/admin/..\\public/x", None),
    ("/public/%2e%2e%2fadmin", None),
    ("/admin/./secret", "/admin/secret"),
    ("/public/./x", "/public/x"),
    ("/public/../admin", "/admin"),
    ("/public/%2E%2E/admin", "/admin"),
    ("/public/%2e%2e/admin", "/admin"),
    ("/public/.%2e/admin", "/admin"),
    ("/%2e/admin/x", "/admin/x"),
    ("/public/x/../../admin/", "/admin/"),
    ("//admin//x", "/admin/x"),
    ("/public//..//admin", "/admin"),
    ("/%61dmin/x", "/admin/x"),  # an unreserved escape is decoded
    ("/public/%252e%252e/admin", "/public/%252e%252e/admin"),  # decoded once: "%2e", not ".."
    ("/public/%252F/x", "/public/%252F/x"),
    ("/admin;x/secret", "/admin;x/secret"),  # path parameters are not stripped (as Envoy)
    ("/public;/../admin", "/admin"),
    ("/public/x;y=1", "/public/x;y=1"),
    ("/admin%00/x", None),
    ("/public/%00", None),
    ("/admin%C0%AFsecret", "/admin%C0%AFsecret"),  # overlong UTF-8 "/": not a separator
    ("/public%c0%af../admin", "/public%C0%AF../admin"),
    ("/admin#x", None),  # a fragment never belongs in a request
    ("/public/#/../admin", None),
    ("/public/x%20y", "/public/x%20y"),
    ("/PUBLIC/x", "/PUBLIC/x"),
    ("public/x", "/public/x"),
    ("/", "/"),
    ("", "/"),
]


def app_views(forwarded: str) -> list[str]:
    """Paths an app may make of what it receives: as is, percent-decoded (once), and decoded
    with dot segments resolved and backslashes read as separators (a lenient server)."""
    decoded = unquote(forwarded)
    lenient = posixpath.normpath(decoded.replace("\\", "/"))
    if decoded.endswith("/") and lenient != "/":
        lenient += "/"
    return [forwarded, decoded, lenient]


def decisions(path: str) -> tuple[bool, bool]:
    """What DENY /admin/* and ALLOW /public/* say about ``path`` (``authorize`` normalizes)."""
    return (authorize(DENY_ADMIN, None, "GET", path).allowed,
            authorize(ALLOW_PUBLIC, None, "GET", path).allowed)


def app_decisions(view: str) -> tuple[bool, bool]:
    """The same rules read on the path the app resolved, literally (no second normalizing)."""
    return not path_matches("/admin/*", view), path_matches("/public/*", view)


@pytest.mark.parametrize(("raw", "forwarded"), ENCODINGS)
def test_what_the_app_receives_is_what_the_policy_decided_on(raw: str, forwarded: str | None
                                                             ) -> None:
    assert request_path(raw) == forwarded
    if forwarded is None:
        return
    assert request_path(forwarded) == forwarded  # normalized once: a fixed point
    assert normalize_path(forwarded) == forwarded
    for view in app_views(forwarded):  # however the app reads it, the same decision
        assert app_decisions(view) == decisions(forwarded), (raw, view)


def test_the_bypasses_of_the_issue_are_closed() -> None:
    for raw in ("/admin%2Fsecret", "/admin/..\\x", "/public/..%2Fadmin", "/admin/..\\public/x"):
        assert request_path(raw) is None  # 400: the app never sees them
    assert decisions(request_path("/public/%2e%2e/admin/x") or "") == (False, False)


@pytest.mark.parametrize(("raw", "forwarded"), [
    ("/admin%2Fsecret", "/admin%2Fsecret"),
    ("/admin%2fsecret", "/admin%2Fsecret"),
    ("/admin%5csecret", "/admin%5Csecret"),
    ("/admin\\secret", "/admin%5Csecret"),  # a raw backslash is sent encoded
    ("/admin/..\\x", "/admin/..%5Cx"),  # "..\\x" is one segment, not a parent
    ("/public/..%2Fadmin", "/public/..%2Fadmin"),
    ("/public/../admin%2Fx", "/admin%2Fx"),
    ("/admin%00", None),
    ("/a#b", None),
])
def test_keep_unchanged_leaves_escaped_slashes_encoded(raw: str, forwarded: str | None) -> None:
    assert request_path(raw, KEEP_UNCHANGED) == forwarded
    if forwarded is not None:
        assert request_path(forwarded, KEEP_UNCHANGED) == forwarded
        # never a separator for matching: the policy reads the encoded form the app gets
        assert app_decisions(forwarded) == decisions(forwarded)


@pytest.mark.parametrize(("raw", "forwarded"), [
    ("/admin%2Fsecret", "/admin/secret"),
    ("/admin%5Csecret", "/admin/secret"),
    ("/admin/..\\x", "/x"),
    ("/public/..%2Fadmin", "/admin"),
    ("/admin/..\\public/x", "/public/x"),
    ("/public/%2e%2e%2fadmin", "/admin"),
    ("/admin%00", None),
])
def test_unescape_and_forward_decodes_then_normalizes(raw: str, forwarded: str | None) -> None:
    assert request_path(raw, UNESCAPE_AND_FORWARD) == forwarded
    if forwarded is not None:
        assert request_path(forwarded, UNESCAPE_AND_FORWARD) == forwarded
        for view in app_views(forwarded):
            assert app_decisions(view) == decisions(forwarded)


def test_the_default_action_is_reject() -> None:
    assert request_path("/a%2Fb") is None
    assert request_path("/a%2Fb", REJECT_REQUEST) is None
    assert request_path("/a/b") == "/a/b"


# --------------------------------------------------------------------------- on the wire


WIRE = dict[str, tuple[Policy, ...]]


def test_wire_round_trip() -> None:
    section = {
        "reviews": [ONLY_FRONTEND, {"action": "DENY", "from": ["*", "ratings"]}],
        "details": [{"name": "open"}],
    }
    parsed = parse_policies(section, SERVICES)
    wire = json.loads(encode(parsed))
    assert list(wire) == ["details", "reviews"]
    assert wire["details"] == [{"name": "open", "action": "ALLOW", "sources": None,
                                "operations": []}]
    assert decode(encode(parsed), WIRE) == parsed == convert(wire, WIRE)


@pytest.mark.parametrize(
    ("obj", "where"),
    [
        ([], "$: Expected `object`, got `array`"),
        ({"r": {}}, "$.r: Expected `array`, got `object`"),
        ({"r": [1]}, "$.r[0]: Expected `object`, got `int`"),
        ({"r": [{"action": "ALLOW"}]}, "$.r[0]: Object missing required field `name`"),
        ({"r": [{"name": ""}]}, "$.r[0]: name: must not be empty"),
        ({"r": [{"name": "a", "action": "AUDIT"}]}, "$.r[0].action: Invalid enum value 'AUDIT'"),
        ({"r": [{"name": "a", "sources": "x"}]}, "$.r[0].sources: Expected `array | null`"),
        ({"r": [{"name": "a", "operations": [{"methods": ["get"]}]}]},
         "$.r[0].operations[0]: methods: 'get' is not one of GET"),
        ({"r": [{"name": "a", "operations": [{"paths": [3]}]}]},
         "$.r[0].operations[0].paths[0]: Expected `str`, got `int`"),
        ({"ok": [{"name": "a"}], "r": [{"name": "a", "operations": [{"paths": [""]}]}]},
         "$.r[0].operations[0]: paths: a path pattern is empty"),
    ],
)
def test_wire_errors_name_the_field(obj: object, where: str) -> None:
    with pytest.raises(ContractError) as info:
        decode(json.dumps(obj), WIRE)
    assert str(info.value).startswith(where), str(info.value)


def test_a_caller_of_another_project_is_named_project_slash_service() -> None:
    """Across hosts (x-composemesh.consul), a sidecar of project ``a`` calls through this
    project's east-west gateway; its certificate names ``a``, and policies name it ``a/web``."""
    parsed = parse_policies({"reviews": [{"from": ["a/web", "productpage"]}]}, SERVICES)
    (policy,) = parsed["reviews"]
    assert authorize(parsed["reviews"], "a/web", "GET", "/").allowed
    assert not authorize(parsed["reviews"], "a/other", "GET", "/").allowed
    assert not authorize(parsed["reviews"], "web", "GET", "/").allowed  # not this project's
    assert policy.sources == frozenset({"a/web", "productpage"})
    assert "is not a mesh identity" in str(error({"reviews": [{"from": ["A B/web"]}]}))
