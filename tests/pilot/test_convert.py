"""Docker listing -> workloads: pure conversion, pairing proxies with their holders."""

import pytest

from composemesh.pilot.sources.docker.convert import workloads_from_containers


def container(
    cid,
    name,
    role,
    of,
    *,
    project="p",
    state="running",
    status="Up 3s",
    ips=("172.20.0.2",),
    mode="default",
    **labels,
):
    base = {"com.docker.compose.project": project, "composemesh.role": role, "composemesh.of": of}
    base.update({k.replace("_", "."): v for k, v in labels.items()})
    return {
        "Id": cid,
        "Names": [f"/{name}"],
        "State": state,
        "Status": status,
        "Labels": base,
        "HostConfig": {"NetworkMode": mode},
        "NetworkSettings": {"Networks": {f"n{i}": {"IPAddress": ip} for i, ip in enumerate(ips)}},
    }


def test_holder_and_proxy_pair_by_namespace():
    listing = [
        container(
            "h1",
            "p-reviews-v1-netns-1",
            "netns",
            "reviews-v1",
            composemesh_service="reviews",
            composemesh_version="v1",
        ),
        container(
            "x1",
            "p-reviews-v1-proxy-1",
            "proxy",
            "reviews-v1",
            mode="container:h1",
            status="Up 5s (healthy)",
            ips=(),
        ),
        container("h2", "p-ratings-netns-1", "netns", "ratings", ips=("172.20.0.3", "10.0.0.3")),
    ]
    workloads, skipped = workloads_from_containers(listing, project="p")
    assert skipped == ()
    by_node = {w.node: w for w in workloads}
    reviews = by_node["p-reviews-v1-netns-1"]
    assert (reviews.service, reviews.version, reviews.compose_service) == (
        "reviews",
        "v1",
        "reviews-v1",
    )
    assert reviews.proxy_container == "p-reviews-v1-proxy-1" and reviews.proxy_healthy
    ratings = by_node["p-ratings-netns-1"]
    assert ratings.service == "ratings" and ratings.version == "v1"
    assert ratings.addresses == ("10.0.0.3", "172.20.0.3")
    assert ratings.proxy_container is None and not ratings.proxy_healthy


def test_other_projects_apps_and_pilot_are_ignored():
    listing = [
        container("h1", "q-web-netns-1", "netns", "web", project="q"),
        container("a1", "p-web-1", "app", "web"),
        {"Id": "z", "Names": ["/p-plain-1"], "Labels": {"com.docker.compose.project": "p"}},
    ]
    workloads, _ = workloads_from_containers(listing, project="p")
    assert workloads == ()


def test_holder_without_of_label_is_skipped_not_fatal():
    bad = container("h9", "p-bad-netns-1", "netns", "")
    good = container("h1", "p-web-netns-1", "netns", "web")
    workloads, skipped = workloads_from_containers([bad, good], project="p")
    assert [w.node for w in workloads] == ["p-web-netns-1"]
    assert len(skipped) == 1 and "p-bad-netns-1" in skipped[0]


def test_stopped_holder_is_not_running_and_unhealthy_proxy_not_ready():
    listing = [
        container("h1", "p-web-netns-1", "netns", "web", state="exited"),
        container(
            "x1",
            "p-web-proxy-1",
            "proxy",
            "web",
            mode="container:h1",
            status="Up 2s (health: starting)",
        ),
    ]
    (w,), _ = workloads_from_containers(listing, project="p")
    assert not w.running and not w.proxy_healthy


def test_dependents_and_stranded_after_holder_restart():
    from composemesh.pilot.sources.docker.convert import dependents_of, is_stranded

    listing = [
        container("h1", "p-web-netns-1", "netns", "web"),
        container("a1", "p-web-1", "app", "web", mode="container:h1"),
        container("x1", "p-web-proxy-1", "proxy", "web", mode="container:h1"),
        container("a2", "p-db-1", "app", "db", mode="container:h2"),
        container("a3", "p-old-1", "app", "web", mode="container:h1", state="exited"),
    ]
    assert dependents_of(listing, "h1") == ["a1", "x1"]
    holder = {"State": {"StartedAt": "2026-11-25T10:00:05.5Z"}}
    before = {"State": {"StartedAt": "2026-11-25T10:00:05.123456789Z"}}
    after = {"State": {"StartedAt": "2026-11-25T10:00:06Z"}}
    assert is_stranded(before, holder)
    assert not is_stranded(after, holder)


def app(cid, name, holder, *, state="running", status="Up 3s"):
    return {
        "Id": cid,
        "Names": [f"/{name}"],
        "State": state,
        "Status": status,
        "Labels": {"com.docker.compose.project": "p"},
        "HostConfig": {"NetworkMode": f"container:{holder}"},
    }


@pytest.mark.parametrize(
    ("apps", "serving"),
    [
        ([app("a1", "p-web-1", "h1")], True),
        ([app("a1", "p-web-1", "h1", status="Up 9s (healthy)")], True),
        ([app("a1", "p-web-1", "h1", state="exited", status="Exited (0)")], False),
        ([app("a1", "p-web-1", "h1", status="Up 1s (health: starting)")], False),
        ([app("a1", "p-web-1", "h1", status="Up 30s (unhealthy)")], False),
        ([], False),
        ([app("a1", "p-web-1", "h1"), app("a2", "p-side-1", "h1", state="exited")], False),
    ],
)
def test_an_endpoint_serves_only_while_its_app_does(apps, serving):
    listing = [container("h1", "p-web-netns-1", "netns", "web"), *apps]
    (w,), _ = workloads_from_containers(listing, project="p")
    assert w.running is serving


def test_published_ports_and_networks_of_the_holder():
    """What inbound enforcement needs: the ports the host reaches, each network's subnet."""
    holder = container("h1", "p-web-netns-1", "netns", "web")
    holder["Ports"] = [
        {"IP": "0.0.0.0", "PrivatePort": 9080, "PublicPort": 8080, "Type": "tcp"},
        {"IP": "::", "PrivatePort": 9080, "PublicPort": 8080, "Type": "tcp"},
        {"IP": "127.0.0.1", "PrivatePort": 443, "PublicPort": 8443, "Type": "tcp"},
        {"PrivatePort": 7000, "Type": "tcp"},  # exposed, not published
        {"IP": "0.0.0.0", "PrivatePort": 53, "PublicPort": 5353, "Type": "udp"},
    ]
    holder["NetworkSettings"]["Networks"] = {
        "p_front": {"IPAddress": "172.20.0.2", "IPPrefixLen": 16, "Gateway": "172.20.0.1"},
        "p_back": {"IPAddress": "10.9.0.5", "IPPrefixLen": 24},
        "p_odd": {"IPAddress": "10.8.0.5"},  # no prefix length: no subnet to speak of
    }
    (web,), _ = workloads_from_containers([holder], project="p")
    assert web.published_ports == (443, 9080)
    assert [(a.name, a.address, a.subnet, a.gateway) for a in web.attachments] == [
        ("p_back", "10.9.0.5", "10.9.0.0/24", ""),
        ("p_front", "172.20.0.2", "172.20.0.0/16", "172.20.0.1"),
    ]
    assert web.networks == (
        ("p_back", "10.9.0.5"), ("p_front", "172.20.0.2"), ("p_odd", "10.8.0.5")
    )
