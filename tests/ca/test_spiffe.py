"""SPIFFE IDs: built from parts, parsed strictly, every refusal with its reason."""

from __future__ import annotations

import pytest

from composemesh.ca.spiffe import MAX_LENGTH, SpiffeId, parse_spiffe, spiffe_id, trust_domain_uri


def test_spiffe_id_shape() -> None:
    assert spiffe_id("cluster.local", "shop", "reviews") == (
        "spiffe://cluster.local/ns/shop/sa/reviews"
    )
    sid = SpiffeId("cluster.local", "shop", "reviews")
    assert str(sid) == sid.uri == "spiffe://cluster.local/ns/shop/sa/reviews"
    assert trust_domain_uri("example.org") == "spiffe://example.org"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("spiffe://cluster.local/ns/shop/sa/reviews", ("cluster.local", "shop", "reviews")),
        (
            "spiffe://example_td-1.org/ns/my-proj_2/sa/Svc.v1",
            ("example_td-1.org", "my-proj_2", "Svc.v1"),
        ),
        ("spiffe://a/ns/b/sa/c", ("a", "b", "c")),
    ],
)
def test_parse_good(uri: str, expected: tuple[str, str, str]) -> None:
    sid = parse_spiffe(uri)
    assert (sid.trust_domain, sid.namespace, sid.service) == expected
    assert sid.uri == uri


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("", "empty"),
        ("http://cluster.local/ns/a/sa/b", "does not start with spiffe://"),
        ("SPIFFE://cluster.local/ns/a/sa/b", "lower-case"),
        ("spiffe:/cluster.local/ns/a/sa/b", "does not start with"),
        ("spiffe://Cluster.Local/ns/a/sa/b", "lower-case letters"),
        ("spiffe://cluster.local:8443/ns/a/sa/b", "no port"),
        ("spiffe://user@cluster.local/ns/a/sa/b", "no user info"),
        ("spiffe://cluster.local/ns/a/sa/b?x=1", "no query"),
        ("spiffe://cluster.local/ns/a/sa/b#frag", "no fragment"),
        ("spiffe://cluster.local", "names a trust domain"),
        ("spiffe://cluster.local/", "names a trust domain"),
        ("spiffe:///ns/a/sa/b", "trust domain is empty"),
        ("spiffe://cluster.local/ns/a/sa/b/", "/ns/<namespace>/sa/<service>"),
        ("spiffe://cluster.local/ns/a/sa", "/ns/<namespace>/sa/<service>"),
        ("spiffe://cluster.local/sa/b/ns/a", "/ns/<namespace>/sa/<service>"),
        ("spiffe://cluster.local/ns/a/sa/b/extra", "/ns/<namespace>/sa/<service>"),
        ("spiffe://cluster.local/ns//sa/b", "namespace is empty"),
        ("spiffe://cluster.local/ns/../sa/b", "may not be '..'"),
        ("spiffe://cluster.local/ns/a/sa/.", "may not be '.'"),
        ("spiffe://cluster.local/ns/a/sa/b%41", "may hold only"),
        ("spiffe://cluster.local/ns/a b/sa/c", "may hold only"),
        ("spiffe://cluster.local/ns/a/sa/b\n", "may hold only"),
        ("spiffe://clüster.local/ns/a/sa/b", "lower-case letters"),
        ("spiffe://cluster.local/ns/a/sa/" + "x" * MAX_LENGTH, "longer than 2048"),
        ("spiffe://" + "a" * 256 + "/ns/a/sa/b", "longer than 255"),
    ],
)
def test_parse_bad(uri: str, reason: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_spiffe(uri)
    assert reason in str(info.value)


def test_parse_rejects_non_string() -> None:
    with pytest.raises(ValueError, match="a SPIFFE ID is a string"):
        parse_spiffe(b"spiffe://cluster.local/ns/a/sa/b")


def test_building_validates_parts() -> None:
    with pytest.raises(ValueError, match="service 'a/b'"):
        SpiffeId("cluster.local", "shop", "a/b")
    with pytest.raises(ValueError, match="trust domain"):
        spiffe_id("Cluster", "shop", "reviews")


def test_length_limit_is_exact() -> None:
    base = "spiffe://cluster.local/ns/a/sa/"
    assert parse_spiffe(base + "x" * (MAX_LENGTH - len(base))).service.startswith("x")
    with pytest.raises(ValueError, match="longer than"):
        parse_spiffe(base + "x" * (MAX_LENGTH - len(base) + 1))
