"""Config and environment parsing: pure, no root needed."""

import pytest

from bwplugin.cni.config import (
    MAX_BURST,
    Direction,
    parse_bandwidth,
    parse_cni_args,
    parse_env,
    parse_netconf,
    parse_policy,
    parse_valid_attachments,
)
from bwplugin.cni.errors import DecodeError, IncompatibleVersionError, InvalidConfigError, InvalidEnvError

BASE_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0"}


def test_env_add_complete():
    env = parse_env({**BASE_ENV, "CNI_ARGS": "K8S_POD_NAME=p;IgnoreUnknown=1", "CNI_PATH": "/a:/b"})
    assert (env.command, env.container_id, env.netns, env.ifname) == ("ADD", "abc123", "/run/netns/x", "eth0")
    assert env.args == {"K8S_POD_NAME": "p", "IgnoreUnknown": "1"}
    assert env.path == ("/a", "/b")


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"CNI_COMMAND": ""}, "CNI_COMMAND"),
        ({"CNI_COMMAND": "FROB"}, "CNI_COMMAND='FROB'"),
        ({"CNI_CONTAINERID": ""}, "CNI_CONTAINERID"),
        ({"CNI_CONTAINERID": "-bad"}, "CNI_CONTAINERID='-bad'"),
        ({"CNI_CONTAINERID": "a b"}, "CNI_CONTAINERID"),
        ({"CNI_IFNAME": ""}, "CNI_IFNAME"),
        ({"CNI_IFNAME": "x" * 16}, "longer than 15"),
        ({"CNI_IFNAME": ".."}, "CNI_IFNAME='..'"),
        ({"CNI_IFNAME": "et/h0"}, "not a valid interface name"),
        ({"CNI_IFNAME": "eth:0"}, "not a valid interface name"),
        ({"CNI_NETNS": ""}, "CNI_NETNS"),
        ({"CNI_ARGS": "novalue"}, "CNI_ARGS entry 'novalue'"),
    ],
)
def test_env_errors_name_the_variable(change, needle):
    with pytest.raises(InvalidEnvError) as err:
        parse_env({**BASE_ENV, **change})
    assert err.value.code == 4
    assert needle in err.value.msg


def test_env_del_needs_no_netns_and_version_needs_nothing():
    env = {**BASE_ENV, "CNI_COMMAND": "DEL"}
    del env["CNI_NETNS"]
    assert parse_env(env).netns == ""
    assert parse_env({"CNI_COMMAND": "VERSION"}).command == "VERSION"
    assert parse_env({"CNI_COMMAND": "GC"}).command == "GC"
    assert parse_env({"CNI_COMMAND": "STATUS"}).command == "STATUS"


def test_ifname_at_the_limit_is_valid():
    assert parse_env({**BASE_ENV, "CNI_IFNAME": "x" * 15}).ifname == "x" * 15


def test_cni_args_parsing():
    assert parse_cni_args("") == {}
    assert parse_cni_args("IgnoreUnknown=1;A=1;;B=") == {"IgnoreUnknown": "1", "A": "1", "B": ""}


# CNI_ARGS as containerd 1.6 sends them (captured), in one of their varying orders
CONTAINERD_ARGS = (
    "K8S_POD_INFRA_CONTAINER_ID=0f1e2d3c4b5a;K8S_POD_UID=7b0c1e2a-5d1f-4c8e-9a3b-2f6d8e1c0a9b;"
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=web-0"
)


def test_pod_identity_from_containerd_cni_args():
    env = parse_env({**BASE_ENV, "CNI_ARGS": CONTAINERD_ARGS})
    assert (env.pod.namespace, env.pod.name, env.pod.uid) == ("team-a", "web-0", "7b0c1e2a-5d1f-4c8e-9a3b-2f6d8e1c0a9b")
    assert env.pod.known
    assert not parse_env(BASE_ENV).pod.known  # a runtime that is not Kubernetes sends none


@pytest.mark.parametrize(
    "args, needle",
    [
        ("K8S_POD_NAME=p;FOO=1", "unknown key(s) FOO"),
        ("IgnoreUnknown=0;FOO=1", "unknown key(s) FOO"),
        ("IgnoreUnknown=maybe", "IgnoreUnknown='maybe' is not a boolean"),
        ("K8S_POD_NAME=a=b", "CNI_ARGS entry 'K8S_POD_NAME=a=b'"),
        ("=x", "CNI_ARGS entry '=x'"),
    ],
)
def test_cni_args_errors_on_add_name_the_entry(args, needle):
    with pytest.raises(InvalidEnvError) as err:
        parse_env({**BASE_ENV, "CNI_ARGS": args})
    assert err.value.code == 4 and needle in err.value.msg


def test_cni_args_ignore_unknown_accepts_any_key_and_go_booleans():
    for flag in ("1", "true", "True", "TRUE"):
        assert parse_env({**BASE_ENV, "CNI_ARGS": f"IgnoreUnknown={flag};FOO=1"}).args["FOO"] == "1"


def test_del_never_fails_over_cni_args():
    env = parse_env(
        {**BASE_ENV, "CNI_COMMAND": "DEL", "CNI_ARGS": "garbage;FOO=1;K8S_POD_NAME=p;x=y=z;IgnoreUnknown=?"}
    )
    assert env.args == {"FOO": "1", "K8S_POD_NAME": "p", "IgnoreUnknown": "?"}
    assert env.pod.name == "p"


def conf(**extra):
    return {"cniVersion": "1.0.0", "name": "net", "type": "bwplugin", **extra}


# runtimeConfig.bandwidth as the runtimes send it for kubernetes.io/ingress-bandwidth: 10M
# and egress-bandwidth: 20M. containerd (go-cni's struct has no JSON tags): Go field names
# and 2^32-1 bit bursts. CRI-O: lower-case keys and bursts of 34359738359 bits.
CONTAINERD_BW = {"IngressRate": 10000000, "IngressBurst": 4294967295, "EgressRate": 20000000, "EgressBurst": 4294967295}
CRIO_BW = {"ingressRate": 10000000, "ingressBurst": 34359738359, "egressRate": 20000000, "egressBurst": 34359738359}


@pytest.mark.parametrize("payload, burst", [(CONTAINERD_BW, 4294967295), (CRIO_BW, 34359738359)])
def test_runtime_payloads_are_read_as_sent(payload, burst):
    bw = parse_bandwidth(conf(runtimeConfig={"bandwidth": payload}))
    assert bw.source == "runtimeConfig"
    assert bw.ingress == Direction(10_000_000, burst)
    assert bw.egress == Direction(20_000_000, burst)


def test_containerd_one_annotation_sends_zeros_for_the_other_direction():
    payload = {"IngressRate": 10000000, "IngressBurst": 4294967295, "EgressRate": 0, "EgressBurst": 0}
    bw = parse_bandwidth(conf(runtimeConfig={"bandwidth": payload}))
    assert bw.ingress == Direction(10_000_000, 4294967295) and bw.egress is None


def test_keys_match_case_insensitively_everywhere_like_go():
    doc = {
        "CNIVersion": "1.0.0", "NAME": "net", "PrevResult": {"cniVersion": "1.0.0"},
        "LatencyMs": 7, "MAXBURSTMS": 3, "EgressRedirect": "mirred",
        "RuntimeConfig": {"Bandwidth": {"egressrate": 10**6, "EGRESSBURST": 10**5, "UnshapedSubnets": ["10.0.0.0/8"]}},
    }  # fmt: skip
    nc = parse_netconf(doc)
    assert (nc.cni_version, nc.name, nc.prev_result) == ("1.0.0", "net", {"cniVersion": "1.0.0"})
    assert (nc.policy.latency_ms, nc.policy.max_burst_ms, nc.policy.egress_redirect) == (7, 3, "mirred")
    assert nc.bandwidth.egress == Direction(10**6, 10**5)
    assert nc.subnets is not None and not nc.subnets.listed_shaped
    # a static key in any case still wins over runtimeConfig, as in the reference
    static = parse_bandwidth(conf(IngressRate=2000, ingressburst=3000, runtimeConfig={"bandwidth": CONTAINERD_BW}))
    assert static.source == "static" and static.ingress == Direction(2000, 3000) and static.egress is None


def test_the_last_spelling_of_a_key_wins_as_in_go():
    bw = parse_bandwidth(
        conf(runtimeConfig={"bandwidth": {"IngressRate": 1000, "ingressRate": 5000, "IngressBurst": 9}})
    )
    assert bw.ingress == Direction(5000, 9)


def test_errors_name_the_key_as_the_runtime_spelled_it():
    with pytest.raises(InvalidConfigError) as err:
        parse_bandwidth(conf(runtimeConfig={"bandwidth": {"IngressRate": "10M", "IngressBurst": 1}}))
    assert err.value.code == 7 and "runtimeConfig.bandwidth.IngressRate must be" in err.value.msg


@pytest.mark.parametrize("key", ["IngresRate", "ingress-rate", "peakRate", "bandwidth"])
def test_an_unreadable_runtime_bandwidth_key_is_an_error_not_ignored(key):
    with pytest.raises(InvalidConfigError) as err:
        parse_bandwidth(conf(runtimeConfig={"bandwidth": {**CONTAINERD_BW, key: 5}}))
    assert err.value.code == 7 and f"runtimeConfig.bandwidth.{key}=5 is not a key bwplugin knows" in err.value.msg


def test_runtime_config_bandwidth():
    bw = parse_bandwidth(conf(runtimeConfig={"bandwidth": {"ingressRate": 10**6, "ingressBurst": 10**5}}))
    assert bw.source == "runtimeConfig"
    assert bw.ingress == Direction(10**6, 10**5)
    assert bw.egress is None


def test_static_keys_win_even_when_zero():
    doc = conf(egressRate=0, runtimeConfig={"bandwidth": {"ingressRate": 10**6, "ingressBurst": 10**5}})
    bw = parse_bandwidth(doc)
    assert bw.source == "static"
    assert not bw.shaped


def test_static_config_used_without_runtime():
    bw = parse_bandwidth(conf(egressRate=2 * 10**6, egressBurst=10**6))
    assert (bw.source, bw.egress) == ("static", Direction(2 * 10**6, 10**6))


def test_no_bandwidth_anywhere():
    assert not parse_bandwidth(conf()).shaped
    assert not parse_bandwidth(conf(runtimeConfig={})).shaped
    assert not parse_bandwidth(conf(runtimeConfig={"portMappings": []})).shaped


@pytest.mark.parametrize(
    "bw, needle",
    [
        ({"ingressRate": 10**6}, "bandwidth.ingressRate=1000000 is set but runtimeConfig.bandwidth.ingressBurst"),
        ({"egressBurst": 10**6}, "bandwidth.egressBurst=1000000 is set but runtimeConfig.bandwidth.egressRate"),
        ({"ingressRate": -1, "ingressBurst": 1}, "ingressRate must be a non-negative integer, got -1"),
        ({"ingressRate": "10M", "ingressBurst": 1}, "ingressRate must be a non-negative integer, got '10M'"),
        ({"ingressRate": True, "ingressBurst": 1}, "got True"),
        ({"ingressRate": 1.5e6 + 0.5, "ingressBurst": 1}, "non-negative integer"),
        ({"ingressRate": None, "ingressBurst": 1}, "got None"),
        ({"ingressRate": 10**6, "ingressBurst": MAX_BURST + 1}, f"ingressBurst={MAX_BURST + 1} exceeds"),
        ({"egressRate": 10**16, "egressBurst": 1}, "egressRate=10000000000000000 exceeds"),
        ({"egressRate": 999, "egressBurst": 1000}, "egressRate=999 is below the minimum"),
    ],
)
def test_bandwidth_errors_are_code_7_and_name_field_and_value(bw, needle):
    with pytest.raises(InvalidConfigError) as err:
        parse_bandwidth(conf(runtimeConfig={"bandwidth": bw}))
    assert err.value.code == 7
    assert needle in err.value.msg


def test_static_errors_name_the_top_level_key():
    with pytest.raises(InvalidConfigError, match=r"^egressRate=5000000 is set but egressBurst is not"):
        parse_bandwidth(conf(egressRate=5 * 10**6))


def test_integral_floats_are_accepted_and_runtime_bursts_fit():
    bw = parse_bandwidth(conf(runtimeConfig={"bandwidth": {"ingressRate": 1e7, "ingressBurst": 4294967295}}))
    assert bw.ingress == Direction(10**7, 4294967295)
    crio = parse_bandwidth(conf(runtimeConfig={"bandwidth": {"egressRate": 10**7, "egressBurst": 34359738359}}))
    assert crio.egress == Direction(10**7, 34359738359)


def test_wrong_container_types():
    with pytest.raises(InvalidConfigError, match="runtimeConfig must be an object"):
        parse_bandwidth(conf(runtimeConfig=[]))
    with pytest.raises(InvalidConfigError, match="runtimeConfig.bandwidth must be an object"):
        parse_bandwidth(conf(runtimeConfig={"bandwidth": "10M"}))


def test_netconf_version_and_name():
    with pytest.raises(InvalidConfigError, match="cniVersion is required"):
        parse_netconf({"name": "n"})
    with pytest.raises(IncompatibleVersionError) as err:
        parse_netconf({"cniVersion": "0.2.0", "name": "n"})
    assert err.value.code == 1 and "'0.2.0'" in err.value.msg and "1.1.0" in err.value.details
    with pytest.raises(InvalidConfigError, match="cniVersion must be a string, got 1"):
        parse_netconf({"cniVersion": 1, "name": "n"})
    with pytest.raises(InvalidConfigError, match="name must be a non-empty string"):
        parse_netconf({"cniVersion": "1.0.0", "name": ""})
    with pytest.raises(InvalidConfigError, match="prevResult must be an object"):
        parse_netconf(conf(prevResult=[1]))


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_every_supported_version_parses(version):
    assert parse_netconf({"cniVersion": version, "name": "n"}).cni_version == version


def test_policy_defaults_and_bounds():
    p = parse_policy({})
    assert (p.latency_ms, p.max_burst_ms) == (25.0, 10.0)
    assert parse_policy({"latencyMs": 5, "maxBurstMs": 0}).max_burst_ms == 0
    with pytest.raises(InvalidConfigError, match="latencyMs=0 must be between 1 and 10000"):
        parse_policy({"latencyMs": 0})
    with pytest.raises(InvalidConfigError, match="maxBurstMs must be a number, got 'x'"):
        parse_policy({"maxBurstMs": "x"})


def test_valid_attachments_both_spellings():
    items = [{"containerID": "c1", "ifname": "eth0"}]
    assert parse_valid_attachments({"cni.dev/valid-attachments": items})[0].container_id == "c1"
    assert parse_valid_attachments({"cni.dev/attachments": items})[0].ifname == "eth0"
    assert parse_valid_attachments({}) is None
    with pytest.raises(InvalidConfigError, match=r"cni.dev/valid-attachments\[0\]"):
        parse_valid_attachments({"cni.dev/valid-attachments": [{"containerID": 1}]})


def test_decode_errors_are_code_6():
    from bwplugin.cni.config import decode

    for bad in (b"", b"{", b"[1]", b"\xff\xfe", b"null"):
        with pytest.raises(DecodeError) as err:
            decode(bad)
        assert err.value.code == 6


# ---------------------------------------------------------------- subnets and redirect mode


def test_subnets_static_and_runtime():
    from ipaddress import ip_network

    from bwplugin.cni.config import parse_subnets

    s = parse_subnets({"unshapedSubnets": ["10.0.0.0/8", "fd00::/8", "10.0.0.0/8"]})
    assert s is not None and not s.listed_shaped and s.key == "unshapedSubnets"
    assert s.networks == (ip_network("10.0.0.0/8"), ip_network("fd00::/8"))  # duplicates dropped
    runtime = {"runtimeConfig": {"bandwidth": {"shapedSubnets": ["192.0.2.0/24"]}}}
    s = parse_subnets(runtime)
    assert s is not None and s.listed_shaped and s.networks == (ip_network("192.0.2.0/24"),)
    # the top-level key wins, as for the rates
    s = parse_subnets({**runtime, "unshapedSubnets": ["10.0.0.0/8"]})
    assert s is not None and not s.listed_shaped
    assert parse_subnets({}) is None and parse_subnets({"shapedSubnets": []}) is None
    assert parse_subnets({"shapedSubnets": None}) is None


@pytest.mark.parametrize(
    "doc, needle",
    [
        ({"shapedSubnets": ["10.0.0.0/8"], "unshapedSubnets": ["fd00::/8"]}, "mutually exclusive"),
        ({"shapedSubnets": "10.0.0.0/8"}, "shapedSubnets must be a list of CIDRs, got '10.0.0.0/8'"),
        ({"shapedSubnets": ["10.0.0.0"]}, "shapedSubnets[0]='10.0.0.0' is not a CIDR"),
        (
            {"shapedSubnets": ["10.0.0.1/8"]},
            "shapedSubnets[0]='10.0.0.1/8' is not a valid CIDR: 10.0.0.1/8 has host bits",
        ),
        ({"unshapedSubnets": ["fd00::/200"]}, "unshapedSubnets[0]='fd00::/200' is not a valid CIDR"),
        ({"unshapedSubnets": [7]}, "unshapedSubnets[0]=7 is not a CIDR"),
        ({"unshapedSubnets": [f"10.{i}.0.0/16" for i in range(65)]}, "65 entries; at most 64"),
        (
            {"runtimeConfig": {"bandwidth": {"shapedSubnets": ["x/y"]}}},
            "runtimeConfig.bandwidth.shapedSubnets[0]='x/y' is not a valid CIDR",
        ),
    ],
)
def test_bad_subnets_are_code_7_naming_field_and_value(doc, needle):
    from bwplugin.cni.config import parse_subnets

    with pytest.raises(InvalidConfigError) as err:
        parse_subnets(doc)
    assert err.value.code == 7 and needle in err.value.msg


def test_egress_redirect_mode():
    assert parse_policy({}).egress_redirect == "auto"
    assert parse_policy({"egressRedirect": "mirred"}).egress_redirect == "mirred"
    for bad in ("MIRRED", "", 1, None):
        with pytest.raises(InvalidConfigError) as err:
            parse_policy({"egressRedirect": bad})
        assert f"egressRedirect={bad!r} must be one of auto, bpf, mirred" in err.value.msg
