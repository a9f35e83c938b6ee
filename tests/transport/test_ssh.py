"""RealTransports' shell against a real in-process asyncssh server (see conftest.py)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sshd_server import LocalSSHD

from kvmstate.errors import HostUnreachable, ParseError, TransportError
from kvmstate.transport.batch import batch_script, parse_batch_output, remote_command
from kvmstate.transport.real import RealTransports

Body = Callable[[RealTransports], Awaitable[Any]]


def with_transports(sshd: LocalSSHD, body: Body, **ssh: Any) -> Any:
    async def main() -> Any:
        async with sshd, RealTransports(sshd.spec(**ssh)) as t:
            return await body(t)

    return asyncio.run(main())


# --- host keys, auth, reachability -------------------------------------------------------------


def test_host_key_verified_with_known_hosts(sshd: LocalSSHD) -> None:
    async def body(t: RealTransports) -> None:
        res = await t.shell("h1").run(["echo", "hello"])
        assert res.stdout == "hello\n"
        assert res.exit_status == 0

    with_transports(sshd, body)
    assert sshd.connections == 1


def test_wrong_host_key_refused_with_clear_message(sshd: LocalSSHD) -> None:
    async def main() -> None:
        async with sshd:
            wrong = sshd.write_wrong_known_hosts()
            async with RealTransports(sshd.spec(known_hosts=str(wrong))) as t:
                with pytest.raises(HostUnreachable) as exc:
                    await t.shell("h1").run(["true"])
        msg = str(exc.value)
        assert f"host key for 127.0.0.1 does not match known_hosts ({wrong})" in msg
        assert exc.value.temporary is False
        assert sshd.sessions == 0

    asyncio.run(main())


def test_unknown_host_refused(sshd: LocalSSHD) -> None:
    async def main() -> None:
        async with sshd:
            other = sshd.write_unknown_known_hosts()
            async with RealTransports(sshd.spec(known_hosts=str(other))) as t:
                with pytest.raises(HostUnreachable) as exc:
                    await t.shell("h1").run(["true"])
        assert f"host key for 127.0.0.1 is not in known_hosts ({other})" in str(exc.value)
        assert exc.value.temporary is False
        assert sshd.sessions == 0

    asyncio.run(main())


def test_missing_known_hosts_file_refused(sshd: LocalSSHD, tmp_path: Path) -> None:
    async def main() -> None:
        async with sshd:
            missing = tmp_path / "nope_known_hosts"
            async with RealTransports(sshd.spec(known_hosts=str(missing))) as t:
                with pytest.raises(HostUnreachable) as exc:
                    await t.shell("h1").run(["true"])
        assert f"known_hosts file {missing} does not exist" in str(exc.value)
        assert sshd.connections == 0

    asyncio.run(main())


def test_verify_host_key_false_accepts_any_key(sshd: LocalSSHD) -> None:
    async def main() -> None:
        async with sshd:
            wrong = sshd.write_wrong_known_hosts()
            spec = sshd.spec(known_hosts=str(wrong), verify_host_key=False)
            async with RealTransports(spec) as t:
                res = await t.shell("h1").run(["echo", "ok"])
        assert res.stdout == "ok\n"

    asyncio.run(main())


def test_auth_failure_is_permission_denied(sshd: LocalSSHD, tmp_path: Path) -> None:
    from kvmstate.transport.sshlib import asyncssh

    other = tmp_path / "other_key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(other))

    async def main() -> None:
        async with sshd, RealTransports(sshd.spec(identity=str(other), user="root")) as t:
            with pytest.raises(HostUnreachable) as exc:
                await t.shell("h1").run(["true"])
        msg = str(exc.value)
        assert "permission denied (publickey)" in msg
        assert f"root@127.0.0.1:{sshd.port}" in msg
        assert exc.value.temporary is False

    asyncio.run(main())


def test_unreachable_port_is_temporary_host_unreachable(sshd: LocalSSHD) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    sshd.known_hosts.write_text("")

    async def main() -> None:
        async with RealTransports(sshd.spec(port=port)) as t:
            with pytest.raises(HostUnreachable) as exc:
                await t.shell("h1").run(["true"])
        assert exc.value.host == "h1"
        assert f"127.0.0.1:{port}" in str(exc.value)
        assert exc.value.temporary is True

    asyncio.run(main())


def test_missing_identity_file_is_clear(sshd: LocalSSHD, tmp_path: Path) -> None:
    async def main() -> None:
        async with sshd:
            spec = sshd.spec(identity=str(tmp_path / "no_such_key"))
            async with RealTransports(spec) as t:
                with pytest.raises(HostUnreachable, match=r"identity file .*no_such_key"):
                    await t.shell("h1").run(["true"])

    asyncio.run(main())


def test_ssh_config_user_used_when_spec_leaves_it_default(sshd: LocalSSHD) -> None:
    import getpass

    # The spec sets no user: ssh_config's User wins over the spec's default ("root").
    async def main() -> None:
        async with sshd:
            sshd.ssh_config.write_text(f"Host 127.0.0.1\n  User {getpass.getuser()}\n")
            from kvmstate.transport.real import target_for
            from kvmstate.transport.ssh import plan_connect

            spec = sshd.spec()
            assert plan_connect(target_for(spec, "h1")).username == ()
            spec2 = sshd.spec(user="root")
            assert plan_connect(target_for(spec2, "h1")).username == "root"
            async with RealTransports(spec) as t:
                assert (await t.shell("h1").run(["true"])).ok

    asyncio.run(main())


# --- run() -------------------------------------------------------------------------------------


def test_run_captures_stdout_stderr_exit(sshd: LocalSSHD) -> None:
    async def body(t: RealTransports) -> None:
        sh = t.shell("h1")
        res = await sh.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
        assert (res.stdout, res.stderr, res.exit_status, res.ok) == ("out\n", "err\n", 3, False)
        res = await sh.run(["cat"], input="line1\nline2")
        assert res.stdout == "line1\nline2"
        res = await sh.run(["cat"])  # no input: stdin gets EOF, no hang
        assert res.stdout == ""
        res = await sh.run(["printf", "%s", "héllo\x01"])
        assert res.stdout == "héllo\x01"

    with_transports(sshd, body)


def test_run_check_raises_transport_error_naming_host_command_stderr(sshd: LocalSSHD) -> None:
    async def body(t: RealTransports) -> None:
        with pytest.raises(TransportError) as exc:
            await t.shell("h1").run(["ls", "/no/such/dir"])
        e = exc.value
        assert e.host == "h1"
        assert e.argv == ["ls", "/no/such/dir"]
        assert e.exit_status == 2
        assert "No such file" in e.stderr
        assert str(e).startswith("h1: `ls /no/such/dir` exit 2: ")
        assert "No such file" in str(e)

    with_transports(sshd, body)


def test_run_timeout(sshd: LocalSSHD) -> None:
    async def body(t: RealTransports) -> None:
        start = time.monotonic()
        with pytest.raises(TransportError, match=r"timed out after 0\.3s") as exc:
            await t.shell("h1").run(["sleep", "5"], timeout=0.3)
        assert exc.value.temporary
        assert time.monotonic() - start < 3
        assert (await t.shell("h1").run(["echo", "still"])).stdout == "still\n"

    with_transports(sshd, body)


def test_commands_run_with_c_locale(sshd: LocalSSHD) -> None:
    async def body(t: RealTransports) -> None:
        one = await t.shell("h1").run(["sh", "-c", "echo $LC_ALL"])
        [many] = await t.shell("h1").run_many([["sh", "-c", "echo $LC_ALL"]])
        assert one.stdout == many.stdout == "C\n"

    with_transports(sshd, body)


INJECTIONS = [
    "; touch {m}",
    "$(touch {m})",
    "`touch {m}`",
    "a\ntouch {m}\n",
    "' ; touch {m}; '",
    '" ; touch {m}; "',
    "&& touch {m}",
    "| touch {m}",
    "$'\\n' touch {m}",
    "*",
    "~root",
    "--",
    "",
]


def test_injection_safety_run_and_run_many(sshd: LocalSSHD) -> None:
    marker = sshd.work / "PWNED"
    args = [a.format(m=marker) for a in INJECTIONS]

    async def body(t: RealTransports) -> None:
        sh = t.shell("h1")
        # python prints its argv as JSON: each argument must arrive as exactly one element
        import json
        import sys

        show = [sys.executable, "-c", "import json,sys; print(json.dumps(sys.argv[1:]))"]
        res = await sh.run([*show, *args])
        assert json.loads(res.stdout) == args
        results = await sh.run_many([[*show, a] for a in args])
        assert [json.loads(r.stdout) for r in results] == [[a] for a in args]

    with_transports(sshd, body)
    assert not marker.exists()


def test_sudo_prefix(sshd: LocalSSHD) -> None:
    assert remote_command(["id", "-u"], sudo=True) == "LC_ALL=C sudo -n -- id -u"
    assert remote_command(["echo", "a b"]) == "LC_ALL=C echo 'a b'"

    async def body(t: RealTransports) -> None:
        assert (await t.shell("h1").run(["echo", "x y"])).stdout == "x y\n"
        [r] = await t.shell("h1").run_many([["echo", "z"]])  # one command: no batch wrapper
        assert r.stdout == "z\n"
        r, _ = await t.shell("h1").run_many([["echo", "w"], ["true"]])
        assert r.stdout == "w\n"

    with_transports(sshd, body, user="deploy", sudo=True, verify_host_key=True)
    logged = sshd.sudo_log.read_text().splitlines()
    assert logged == ["-n -- echo x y", "-n -- echo z", "-n -- sh -s"]


# --- run_many() --------------------------------------------------------------------------------


def test_run_many_separate_results_with_tricky_output(sshd: LocalSSHD) -> None:
    async def body(t: RealTransports) -> list[Any]:
        sh = t.shell("h1")
        # the wrapper's header format, with guesses at the nonce
        fake = "KVMSTATE-" + "0" * 32 + " 1 0\n"
        argvs = [
            ["printf", "%s", "no newline"],
            ["printf", "%s", fake + "KVMSTATE-x end\n"],
            ["sh", "-c", "echo only-err >&2"],
            ["sh", "-c", "echo partial; exit 7"],
            ["sh", "-c", "printf '\\000\\001\\377binary'"],
            ["true"],
            ["sh", "-c", "exit 0; echo never"],
            ["definitely-not-a-command-kvmstate"],
            ["sh", "-c", "cat; echo read-eof"],  # stdin is /dev/null: no hang
            ["sh", "-c", "exit 255"],
            ["exit", "3"],  # a builtin cannot end the batch
            ["echo", "after"],
        ]
        return await sh.run_many(argvs)

    results = with_transports(sshd, body)
    assert len(results) == 12
    r = results
    assert (r[0].stdout, r[0].stderr, r[0].exit_status) == ("no newline", "", 0)
    assert r[1].stdout == "KVMSTATE-" + "0" * 32 + " 1 0\nKVMSTATE-x end\n"
    assert (r[2].stdout, r[2].stderr, r[2].exit_status) == ("", "only-err\n", 0)
    assert (r[3].stdout, r[3].exit_status) == ("partial\n", 7)
    assert r[4].stdout == "\x00\x01\ufffdbinary"
    assert (r[5].stdout, r[5].exit_status) == ("", 0)
    assert (r[6].stdout, r[6].exit_status) == ("", 0)
    assert r[7].exit_status == 127 and "not found" in r[7].stderr
    assert r[8].stdout == "read-eof\n"
    assert r[9].exit_status == 255
    assert r[10].exit_status == 3
    assert r[11].stdout == "after\n"
    assert [x.argv for x in r][:2] == [("printf", "%s", "no newline"), r[1].argv]
    assert all(x.host == "h1" for x in r)
    assert sshd.sessions == 1  # one exec channel for all twelve


def test_run_many_runs_its_reads_concurrently_in_order(sshd: LocalSSHD, tmp_path: Path) -> None:
    """The first command can only succeed if the second runs while it waits (a one-after-
    another batch would fail it after its 10 s bound); more commands than the concurrency
    cap (16) still get their own statuses and outputs, in order."""
    flag = tmp_path / "flag"
    waits = (
        'i=0; while [ ! -e "$0" ]; do i=$((i+1)); [ $i -lt 200 ] || exit 9; sleep 0.05; done; '
        "echo saw-it"
    )

    async def body(t: RealTransports) -> list[Any]:
        return await t.shell("h1").run_many(
            [
                ["sh", "-c", waits, str(flag)],
                ["touch", "--", str(flag)],
                *(["sh", "-c", f"echo out-{n}; exit {n}"] for n in range(40)),
            ]
        )

    first, second, *rest = with_transports(sshd, body)
    assert (first.exit_status, first.stdout) == (0, "saw-it\n")
    assert second.exit_status == 0
    assert [r.exit_status for r in rest] == list(range(40))
    assert [r.stdout for r in rest] == [f"out-{n}\n" for n in range(40)]
    assert sshd.sessions == 1


def test_run_many_of_one_command_keeps_the_contract(sshd: LocalSSHD) -> None:
    """A single command goes without the batch wrapper: one exec, its own exit status and
    output, never raised."""

    async def body(t: RealTransports) -> list[Any]:
        sh = t.shell("h1")
        return [
            *(await sh.run_many([["sh", "-c", "echo out; echo err >&2; exit 3"]])),
            *(await sh.run_many([["exit", "4"]])),
            *(await sh.run_many([["definitely-not-a-command-kvmstate"]])),
        ]

    a, b, c = with_transports(sshd, body)
    assert (a.exit_status, a.stdout, a.stderr) == (3, "out\n", "err\n")
    assert a.argv == ("sh", "-c", "echo out; echo err >&2; exit 3")
    assert b.exit_status == 4
    assert c.exit_status == 127 and "not found" in c.stderr
    assert sshd.sessions == 3


def test_run_many_large_output_and_empty(sshd: LocalSSHD) -> None:
    async def body(t: RealTransports) -> list[Any]:
        assert await t.shell("h1").run_many([]) == []
        return await t.shell("h1").run_many(
            [["head", "-c", "300000", "/dev/zero"], ["seq", "1", "20000"]]
        )

    big, seq = with_transports(sshd, body)
    assert big.stdout == "\x00" * 300000
    assert seq.stdout.splitlines()[-1] == "20000"


def _run_locally(script: str) -> bytes:
    import subprocess

    return subprocess.run(["sh", "-s"], input=script.encode(), capture_output=True).stdout


def test_batch_parser_on_real_output_and_its_corruptions() -> None:
    nonce = "ab" * 16
    argvs = [["printf", "hi"], ["sh", "-c", "printf x >&2; exit 2"]]
    out = _run_locally(batch_script(argvs, nonce))
    res = parse_batch_output("h", argvs, nonce, b"noise from bashrc" + out)
    assert [(r.stdout, r.stderr, r.exit_status) for r in res] == [("hi", "", 0), ("", "x", 2)]
    m = f"KVMSTATE-{nonce}".encode()
    with pytest.raises(ParseError, match="'end' section"):
        parse_batch_output("h", argvs, nonce, out.rsplit(m, 1)[0])
    with pytest.raises(ParseError, match="no status line"):
        parse_batch_output("h", argvs, nonce, out.split(m, 1)[0])
    with pytest.raises(ParseError, match="expected 3 exit statuses"):
        parse_batch_output("h", [*argvs, ["true"]], nonce, out)
    with pytest.raises(ParseError, match="sizes do not match"):
        parse_batch_output("h", argvs, nonce, out.replace(b"aGl4", b"aGl4eA=="))
    with pytest.raises(ParseError, match="bad base64"):
        parse_batch_output("h", argvs, nonce, out.replace(b"aGl4", b"a!l4"))
    # the same output read with another nonce has no status line
    with pytest.raises(ParseError):
        parse_batch_output("h", argvs, "cd" * 16, out)
    with pytest.raises(ValueError):
        batch_script([["a"]], "not-hex")
    with pytest.raises(ValueError):
        batch_script([[]], nonce)


def test_batch_temp_dir_is_private_and_removed(tmp_path: Path) -> None:
    import os
    import subprocess

    nonce = "ef" * 16
    script = batch_script([["sh", "-c", 'stat -c %a "$(dirname "$0")"'], ["true"]], nonce)
    wrapped = '  if [ "$1" = sh ]; then set -- "$@" "$d/0.o"; fi; "$@" </dev/null'
    assert '  "$@" </dev/null' in script
    script = script.replace('  "$@" </dev/null', wrapped)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run(["sh", "-s"], input=script.encode(), capture_output=True, env=env).stdout
    res = parse_batch_output("h", [["x"], ["true"]], nonce, out)
    assert res[0].stdout == "700\n"
    assert list(tmp_path.iterdir()) == []


def test_run_many_wrapper_failure_is_transport_error(sshd: LocalSSHD) -> None:
    # sudo shim refuses (no -n): the wrapper never runs; the error names host and stderr.
    async def body(t: RealTransports) -> None:
        (sshd.root / "bin" / "sudo").write_text(
            "#!/bin/sh\necho 'sudo: a password is required' >&2\nexit 1\n"
        )
        with pytest.raises(TransportError) as exc:
            await t.shell("h1").run_many([["true"], ["echo", "x"]])
        assert exc.value.host == "h1"
        assert "a password is required" in str(exc.value)

    with_transports(sshd, body, sudo=True, user="deploy")


# --- one connection, counted -------------------------------------------------------------------


def test_one_connection_reused_and_concurrent_first_use_shares_it(sshd: LocalSSHD) -> None:
    async def body(t: RealTransports) -> None:
        sh = t.shell("h1")
        results = await asyncio.gather(*(sh.run(["echo", str(i)]) for i in range(20)))
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(20)]
        for _ in range(5):
            await sh.run(["true"])
        await sh.run_many([["true"], ["true"], ["true"]])
        assert t.stats() == {"h1": {"connections": 1, "channels": 26}}

    with_transports(sshd, body)
    assert sshd.connections == 1
    assert sshd.sessions == 26


def test_many_hosts_in_parallel_one_connection_each(sshd: LocalSSHD) -> None:
    async def main() -> None:
        async with sshd, RealTransports(sshd.spec(hosts=5)) as t:
            await t.connect_all()
            res = await asyncio.gather(
                *(t.shell(h).run_many([["echo", h], ["true"]]) for h in t.spec.hosts)
            )
            assert [r[0].stdout for r in res] == [f"{h}\n" for h in t.spec.hosts]
            assert all(s == {"connections": 1, "channels": 1} for s in t.stats().values())
        assert sshd.connections == 5

    asyncio.run(main())


def test_reconnects_after_connection_lost(sshd: LocalSSHD) -> None:
    async def body(t: RealTransports) -> None:
        sh = t.shell("h1")
        await sh.run(["true"])
        conn = await t.ssh_host("h1").connection()
        conn.abort()
        await asyncio.sleep(0.05)
        assert (await sh.run(["echo", "back"])).stdout == "back\n"
        assert t.stats()["h1"]["connections"] == 2

    with_transports(sshd, body)


def test_unknown_host_name_is_key_error(sshd: LocalSSHD) -> None:
    sshd.port = 2222
    t = RealTransports(sshd.spec())
    with pytest.raises(KeyError, match="unknown host 'nope'"):
        t.shell("nope")


def test_connect_and_run_many_cost_one_connection_and_one_channel_each(
    sshd: LocalSSHD,
) -> None:
    """What connect + run_many(5) costs, counted (its wall time is ``bench.transport``'s)."""
    argvs = [["true"], ["echo", "a"], ["uname"], ["id", "-u"], ["pwd"]]

    async def body(t: RealTransports) -> None:
        first = await t.shell("h1").run_many(argvs)
        again = await t.shell("h1").run_many(argvs)
        assert [r.exit_status for r in first + again] == [0] * 10
        assert first[1].stdout == again[1].stdout == "a\n"
        assert t.stats()["h1"] == {"connections": 1, "channels": 2}
        assert (sshd.connections, sshd.sessions) == (1, 2)

    with_transports(sshd, body)


def test_connect_timeout_is_temporary_host_unreachable(sshd: LocalSSHD) -> None:
    """A server that accepts TCP but never speaks SSH: connect_timeout applies."""

    async def main() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        sshd.port = server.sockets[0].getsockname()[1]
        sshd.known_hosts.write_text("")
        start = time.monotonic()
        async with RealTransports(sshd.spec(connect_timeout=0.5)) as t:
            with pytest.raises(HostUnreachable) as exc:
                await t.shell("h1").run(["true"])
        assert time.monotonic() - start < 3
        assert "timed out after 0.5s" in str(exc.value)
        assert exc.value.temporary
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_ssh_config_alias_port_user_identity(sshd: LocalSSHD) -> None:
    """The spec names only the alias; HostName, Port, User, IdentityFile come from ssh_config."""
    import getpass

    from kvmstate.spec import Spec

    async def main() -> None:
        async with sshd:
            sshd.ssh_config.write_text(
                "Host kvmalias\n"
                "  HostName 127.0.0.1\n"
                f"  Port {sshd.port}\n"
                f"  User {getpass.getuser()}\n"
                f"  IdentityFile {sshd.identity}\n"
            )
            spec = Spec.model_validate(
                {
                    "version": 1,
                    "ssh": {"known_hosts": str(sshd.known_hosts), "config": str(sshd.ssh_config)},
                    "hosts": {"h1": {"address": "kvmalias"}},
                }
            )
            async with RealTransports(spec) as t:
                assert (await t.shell("h1").run(["echo", "via alias"])).stdout == "via alias\n"
        assert sshd.connections == 1

    asyncio.run(main())


def test_concurrent_sessions_capped_under_sshd_maxsessions(sshd: LocalSSHD) -> None:
    async def main() -> None:
        async with sshd, RealTransports(sshd.spec(), max_sessions=3) as t:
            sh = t.shell("h1")
            res = await asyncio.gather(*(sh.run(["sleep", "0.05"]) for _ in range(12)))
            assert all(r.ok for r in res)
        assert sshd.max_active == 3
        assert sshd.connections == 1

    asyncio.run(main())


def test_failed_connect_shared_by_concurrent_callers_permanent_remembered(
    sshd: LocalSSHD,
) -> None:
    async def main() -> None:
        async with sshd:
            wrong = sshd.write_wrong_known_hosts()
            async with RealTransports(sshd.spec(known_hosts=str(wrong))) as t:
                sh = t.shell("h1")
                res = await asyncio.gather(
                    *(sh.run(["true"]) for _ in range(10)), return_exceptions=True
                )
                assert all(isinstance(r, HostUnreachable) for r in res)
                with pytest.raises(HostUnreachable, match="does not match"):
                    await sh.run(["true"])  # remembered: no new attempt
        assert sshd.connections == 1  # one TCP connection reached the server, not 11

    asyncio.run(main())


def test_temporary_connect_failure_is_retried_by_the_next_caller(sshd: LocalSSHD) -> None:
    async def main() -> None:
        async with sshd:
            port = sshd.port
            await sshd.stop()
            async with RealTransports(sshd.spec()) as t:
                sh = t.shell("h1")
                res = await asyncio.gather(
                    *(sh.run(["true"]) for _ in range(5)), return_exceptions=True
                )
                assert all(isinstance(r, HostUnreachable) and r.temporary for r in res)
                await sshd.start(port)  # the host comes back
                assert (await sh.run(["echo", "back"])).stdout == "back\n"
                assert t.stats()["h1"]["connections"] == 1

    asyncio.run(main())


def test_base_read_and_atomic_write_over_real_ssh(sshd: LocalSSHD, tmp_path: Path) -> None:
    from kvmstate.transport.base import read_file, write_file

    target = tmp_path / "etc" / "exports"
    target.parent.mkdir()

    async def body(t: RealTransports) -> None:
        sh = t.shell("h1")
        assert await read_file(sh, str(target)) is None
        await write_file(sh, str(target), "/srv/images 10.77.0.0/24(rw)\n", mode="0640")
        assert await read_file(sh, str(target)) == "/srv/images 10.77.0.0/24(rw)\n"
        await write_file(sh, str(target), "no newline at end")
        assert await read_file(sh, str(target)) == "no newline at end"

    with_transports(sshd, body)
    assert oct(target.stat().st_mode & 0o777) == "0o640"  # kept from the first write
    assert [p.name for p in target.parent.iterdir()] == ["exports"]  # no temp file left


@pytest.mark.skipif(not shutil.which("ssh-agent"), reason="needs ssh-agent")
def test_key_from_ssh_agent(
    sshd: LocalSSHD, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No identity in the spec, none in ~/.ssh: the key comes from the agent."""
    import subprocess

    from kvmstate.spec import Spec

    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.02)
        env = {"SSH_AUTH_SOCK": str(sock), "PATH": "/usr/bin:/bin"}
        subprocess.run(["ssh-add", "-q", str(sshd.identity)], env=env, check=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        monkeypatch.setenv("HOME", str(tmp_path))  # no default keys to fall back on

        async def main() -> None:
            async with sshd:
                spec = Spec.model_validate(
                    {
                        "version": 1,
                        "ssh": {
                            "port": sshd.port,
                            "known_hosts": str(sshd.known_hosts),
                            "config": str(sshd.ssh_config),
                        },
                        "hosts": {"h1": {"address": "127.0.0.1"}},
                    }
                )
                async with RealTransports(spec) as t:
                    assert (await t.shell("h1").run(["echo", "agent"])).stdout == "agent\n"

        asyncio.run(main())
    finally:
        agent.terminate()
        agent.wait(timeout=5)


def test_connection_lost_mid_command_is_host_unreachable_not_exit_255(sshd: LocalSSHD) -> None:
    async def body(t: RealTransports) -> None:
        sh = t.shell("h1")
        await sh.run(["true"])
        conn = await t.ssh_host("h1").connection()
        asyncio.get_running_loop().call_later(0.2, conn.abort)
        with pytest.raises(HostUnreachable, match="lost: closed while a command was running") as e:
            await sh.run(["sleep", "3"], check=False)
        assert e.value.temporary
        [r] = await sh.run_many([["echo", "again"]])  # reconnects
        assert r.stdout == "again\n"

    with_transports(sshd, body)
    assert sshd.connections == 2
