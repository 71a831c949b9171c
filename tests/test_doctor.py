"""``minipacs doctor PEER`` (scp/peers.py): each step against real peers, and each failure
said in plain words with what to change: our own server, DCMTK's storescp with Nagle's
algorithm on and off, a closed port, a peer that rejects our AE title or its own. (The TLS
port: tests/test_tls.py.)"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import yaml

from scp.config import PeerConfig
from scp.peers import FIND_RESPONSES, Diagnosis, doctor
from tests.conftest import Running, associate, reserved_port
from tests.factory import make_ds
from tests.test_cli import minipacs_command
from tests.test_routing import storescp

CT = "1.2.840.10008.5.1.4.1.1.2"
TIMEOUT = 30.0


def steps(found: Diagnosis) -> dict[str, tuple[bool, str, str]]:
    return {f.step: (f.ok, f.said, f.advice) for f in found.findings}


def itself(running: Running, title: str = "MINIPACS") -> PeerConfig:
    return PeerConfig(ae_title=title, host="127.0.0.1", port=running.port)


def test_our_own_server_passes_every_step(
        start_server: Callable[..., Running]) -> None:
    running = start_server()
    assoc = associate(running)
    try:
        for _ in range(FIND_RESPONSES + 2):  # more studies than the doctor takes
            assert assoc.send_c_store(make_ds()).Status == 0
    finally:
        assoc.release()
    found = doctor(running.config, itself(running), running.archive.held_syntaxes())
    assert found.ok, found.findings
    said = steps(found)
    assert list(said) == ["connect", "C-ECHO", "contexts", "C-FIND"]
    answered = said["C-FIND"][1]
    count = int(answered.split(" ", 1)[0])  # the cancel may come after the last response
    assert FIND_RESPONSES <= count <= FIND_RESPONSES + 2, answered
    assert " response(s), the first after " in answered
    assert answered.endswith("(cancelled there)") or count == FIND_RESPONSES + 2, answered
    assert CT in {cls for cls, _ in found.accepted} and not found.rejected


def test_a_closed_port(start_server: Callable[..., Running], held_port: int) -> None:
    running = start_server()
    found = doctor(running.config, PeerConfig(ae_title="X", host="127.0.0.1", port=held_port))
    assert not found.ok
    ok, said, advice = steps(found)["connect"]
    assert said == f"cannot connect to 127.0.0.1:{held_port}: Connection refused"
    assert advice == "nothing listens there: is the peer running, and is the port right?"


def test_a_name_that_does_not_resolve(start_server: Callable[..., Running]) -> None:
    running = start_server()
    found = doctor(running.config, PeerConfig(ae_title="X", host="no-such-host.invalid",
                                              port=104))
    ok, said, advice = steps(found)["connect"]
    assert not ok and said.startswith("'no-such-host.invalid' does not resolve")
    assert advice == "check peers[].host"


def test_the_peer_answers_to_another_ae_title(start_server: Callable[..., Running]) -> None:
    running = start_server(**{"security.require_called_ae_title": True})
    found = doctor(running.config, itself(running, "SOMEONE"))
    ok, said, advice = steps(found)["association"]
    assert not ok
    assert said.endswith("rejected it: Rejected Permanent, Called AE title not recognised")
    assert advice == ("the peer does not answer to AE title 'SOMEONE': set peers[].ae_title"
                      " to the peer's own AE title")


def test_the_peer_does_not_know_us(start_server: Callable[..., Running]) -> None:
    running = start_server(**{"security.allow_unknown_peers": False},
                           peers=[{"ae_title": "FRIEND"}])
    stranger = dataclasses.replace(
        running.config, ae=dataclasses.replace(running.config.ae, title="STRANGER"))
    found = doctor(stranger, itself(running))
    ok, said, advice = steps(found)["association"]
    assert not ok and said.endswith("Calling AE title not recognised")
    assert advice == ("the peer does not know us: add AE title 'STRANGER' (this host) to the"
                      " peer's known AEs")


def test_dcmtk_with_nagles_algorithm_on_is_named_and_without_it_passes(
        start_server: Callable[..., Running]) -> None:
    running = start_server()
    for nagle in (True, False):
        with reserved_port() as port:
            pass  # free again: storescp takes it
        with storescp("READER", port, nagle=nagle):
            found = doctor(running.config, PeerConfig(ae_title="READER", host="127.0.0.1",
                                                      port=port))
        ok, said, advice = steps(found)["C-ECHO"]
        if nagle:
            assert not ok, said
            assert said.startswith("each answer takes") and "Nagle's algorithm" in advice
            assert "TCP_NODELAY=1" in advice
        else:
            assert ok and said.startswith("Success"), said
        assert steps(found)["C-FIND"] == (
            True, "the peer offers no Study Root C-FIND (a storage SCP only)", "")
        assert steps(found)["contexts"][0], found.findings  # storescp takes CT and MR


def test_the_command_prints_each_step(tmp_path: Path) -> None:
    with reserved_port() as port:
        pass
    config = tmp_path / "minipacs.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"data_dir": str(tmp_path / "data")},
        "peers": [{"ae_title": "READER", "host": "127.0.0.1", "port": port},
                  {"ae_title": "CALLER"}]}))
    run = [*minipacs_command(), "doctor", "--config", str(config)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    with storescp("READER", port):
        done = subprocess.run([*run, "READER"], capture_output=True, text=True, env=env,
                              timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"doctor: READER at 127.0.0.1:{port}, called by MINIPACS"
    assert lines[1].startswith("  ok   connect: TCP connection to")
    assert lines[2].startswith("  ok   C-ECHO: Success")
    assert any(line.startswith("  accepted CT Image Storage (1.2.840.10008.5.1.4.1.1.2) in")
               for line in lines)
    assert lines[-1] == "no problem found"
    failed = subprocess.run([*run, "READER"], capture_output=True, text=True, env=env,
                            timeout=120)  # storescp is gone
    assert failed.returncode == 1 and "FAIL connect" in failed.stdout
    assert failed.stdout.splitlines()[-1] == "problems found: see FAIL above"
    for unknown in ("CALLER", "NOBODY"):
        refused = subprocess.run([*run, unknown], capture_output=True, text=True, env=env,
                                 timeout=120)
        assert refused.returncode == 2
        assert f"{unknown!r} is not in peers, or has no host" in refused.stderr


def test_the_pages_echo_says_a_rejection_in_words(start_server: Callable[..., Running]
                                                  ) -> None:
    """scp.peers.echo, the page's button: the peer's reason (PS3.8 9.3.4) and a hint."""
    from scp.peers import echo

    running = start_server(**{"security.require_called_ae_title": True})
    rejected = echo(running.config, itself(running, "SOMEONE"))
    assert not rejected.ok
    assert rejected.message.startswith(
        f"SOMEONE at 127.0.0.1:{running.port} rejected the association: Rejected Permanent,"
        " by the Service User: Called AE title not recognised")
    assert echo(running.config, itself(running)).ok
