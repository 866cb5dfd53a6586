"""Inputs and failures that once answered 999 (internal error) with a traceback, and
now get their proper CNI codes. No root needed."""

from __future__ import annotations

import json

import pytest

from bwplugin import cli
from bwplugin.cni.config import decode
from bwplugin.cni.errors import DecodeError, TryAgainLaterError
from bwplugin.datapath import bpf

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/none", "CNI_IFNAME": "eth0"}


def test_deeply_nested_stdin_is_a_decode_error() -> None:
    with pytest.raises(DecodeError) as err:
        decode("[" * 100_000 + "]" * 100_000)
    assert err.value.code == 6 and "nested too deeply" in err.value.msg
    code, out = cli.run(ENV, b"[" * 100_000 + b"]" * 100_000)
    assert code == 1 and out is not None and out["code"] == 6


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
def test_a_deep_prev_result_that_json_accepts_is_still_code_6_not_999(command: str) -> None:
    deep: object = "x"
    for _ in range(900):  # under the JSON decoder's limit, over what a deep copy can walk
        deep = {"n": deep}
    conf = {"cniVersion": "1.0.0", "name": "n", "ingressRate": 10**6, "ingressBurst": 10**5,
            "prevResult": {"cniVersion": "1.0.0", "interfaces": [], "dns": deep}}  # fmt: skip
    code, out = cli.run({**ENV, "CNI_COMMAND": command}, json.dumps(conf).encode())
    assert out is None or out["code"] != 999, out
    if command == "ADD":
        assert code == 1 and out is not None and out["code"] == 6, out


def test_a_compile_that_times_out_is_try_again_later(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(bpf, "COMPILE_TIMEOUT", 0.05)
    monkeypatch.setenv("BWPLUGIN_PIN_DIR", str(tmp_path / "pins"))
    with pytest.raises(TryAgainLaterError) as err:
        bpf.compile_in_child()
    assert err.value.code == 11 and "took over 0.05 s" in err.value.msg
    assert not (tmp_path / "pins").exists() or not any((tmp_path / "pins").iterdir())
