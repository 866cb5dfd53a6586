"""Result conversion, naming, netlink encoding and the CLI's error paths: pure."""

import json

import pytest

from bwplugin import cli
from bwplugin.cni.protocol import convert_result, host_interface_names, version_output, with_interface
from bwplugin.datapath.naming import IfbLabel, format_alias, ifb_name, parse_alias
from bwplugin.datapath.netlink import nla_nested, nla_str, nla_u32, nla_u64, parse_attrs

PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "veth1", "mac": "aa:bb:cc:dd:ee:ff"}, {"name": "eth0", "sandbox": "/run/netns/x"}],
    "ips": [{"interface": 1, "address": "10.1.0.2/24", "gateway": "10.1.0.1"}, {"address": "fd00::2/64"}],
    "routes": [{"dst": "0.0.0.0/0"}],
}


def test_convert_to_old_versions_adds_ip_version():
    out = convert_result(PREV, "0.3.1")
    assert out["cniVersion"] == "0.3.1"
    assert [ip["version"] for ip in out["ips"]] == ["4", "6"]
    assert PREV["cniVersion"] == "1.0.0"  # input untouched


def test_convert_to_1x_drops_ip_version():
    old = convert_result(PREV, "0.4.0")
    new = convert_result(old, "1.1.0")
    assert new["cniVersion"] == "1.1.0"
    assert all("version" not in ip for ip in new["ips"])
    assert new["interfaces"] == PREV["interfaces"]


def test_convert_rejects_garbage():
    with pytest.raises(Exception, match=r"prevResult.ips\[0\].address='nope'"):
        convert_result({"ips": [{"address": "nope"}]}, "0.4.0")
    with pytest.raises(Exception, match="0.2.0-style"):
        convert_result({"ip4": {}}, "1.0.0")


def test_host_interfaces_and_append():
    assert host_interface_names(PREV) == ["veth1"]
    out = with_interface(PREV, "bwplxyz", "02:00:00:00:00:01")
    assert out["interfaces"][-1] == {"name": "bwplxyz", "mac": "02:00:00:00:00:01"}
    assert len(PREV["interfaces"]) == 2


def test_version_output():
    assert version_output("0.4.0") == {
        "cniVersion": "0.4.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }
    assert version_output("9.9.9")["cniVersion"] == "1.1.0"


def test_ifb_names_differ_per_ifname_and_fit():
    a = ifb_name("net", "cid", "eth0")
    b = ifb_name("net", "cid", "eth1")
    c = ifb_name("net2", "cid", "eth0")
    assert len({a, b, c}) == 3
    assert all(len(n) == 15 and n.startswith("bwpl") for n in (a, b, c))


def test_alias_roundtrip_and_truncation():
    label = IfbLabel("abc", 42, 7, "eth0", "c" * 64)
    assert parse_alias(format_alias(label)) == label
    assert len(format_alias(IfbLabel("abc", 1, 7, "eth0", "c" * 400))) == 255
    assert parse_alias("something else") is None
    assert parse_alias("bwplugin net=x") is None


def test_netlink_attr_roundtrip():
    buf = nla_u32(1, 7) + nla_str(3, "eth0") + nla_u64(4, 2**40) + nla_nested(18, nla_str(1, "ifb"))
    attrs = parse_attrs(buf)
    assert attrs[1] == (7).to_bytes(4, "little")
    assert attrs[3] == b"eth0\0"
    assert int.from_bytes(attrs[4], "little") == 2**40
    assert parse_attrs(attrs[18])[1] == b"ifb\0"  # the nested flag is masked off


def run(env, stdin):
    code, out = cli.run(env, stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode())
    return code, out


def test_cli_version():
    code, out = run({"CNI_COMMAND": "VERSION"}, {"cniVersion": "1.0.0"})
    assert code == 0 and out["cniVersion"] == "1.0.0" and "1.1.0" in out["supportedVersions"]
    code, out = run({"CNI_COMMAND": "VERSION"}, b"")
    assert code == 0 and out["cniVersion"] == "1.1.0"


ADD = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/nonexistent", "CNI_IFNAME": "eth0"}


@pytest.mark.parametrize(
    "env, stdin, code, needle",
    [
        ({}, {"cniVersion": "1.0.0", "name": "n"}, 4, "CNI_COMMAND"),
        (ADD, b"{not json", 6, "decode"),
        (ADD, {"cniVersion": "0.1.0", "name": "n"}, 1, "'0.1.0'"),
        (ADD, {"cniVersion": "1.0.0", "name": "n", "ingressRate": 5}, 7, "ingressRate=5 is set"),
        (ADD, {"cniVersion": "1.0.0", "name": "n"}, 7, "prevResult is required"),
        ({**ADD, "CNI_IFNAME": "a/b"}, {"cniVersion": "1.0.0", "name": "n"}, 4, "CNI_IFNAME"),
    ],
)
def test_cli_errors_are_spec_json(env, stdin, code, needle):
    rc, out = run(env, stdin)
    assert rc == 1
    assert out["code"] == code and needle in out["msg"]
    assert set(out) <= {"cniVersion", "code", "msg", "details"}


def test_cli_error_carries_config_version():
    rc, out = run(ADD, {"cniVersion": "0.4.0", "name": "n", "egressBurst": 9})
    assert (rc, out["cniVersion"], out["code"]) == (1, "0.4.0", 7)


def test_cli_add_without_shaping_passes_result_through_converted():
    rc, out = run(ADD, {"cniVersion": "0.4.0", "name": "n", "prevResult": PREV})
    assert rc == 0
    assert out == convert_result(PREV, "0.4.0")


def test_cli_check_rejects_0_3_x():
    env = {**ADD, "CNI_COMMAND": "CHECK"}
    rc, out = run(env, {"cniVersion": "0.3.1", "name": "n", "prevResult": PREV})
    assert (rc, out["code"]) == (1, 1)
