"""The storage host's NFS server: rpcbind + NFS-Ganesha (FSAL VFS), fed by ``exportfs``."""

from __future__ import annotations

import logging
import subprocess

from kvmstate.lab.config import HostConfig, LabConfig
from kvmstate.lab.hosts import HOST_ENV, in_host
from kvmstate.lab.netns import host_argv
from kvmstate.lab.proc import PidRegistry, run, spawn, tcp_port_ready, unix_socket_ready, wait_for

log = logging.getLogger(__name__)

GANESHA_CONF = """# NFS-Ganesha of the kvmstate lab storage host {name}.
# Exports come from /etc/exports through `exportfs` (see exports.conf).
NFS_CORE_PARAM {{
    Bind_addr = {address};
    Protocols = 3, 4;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    NFS_Port = 2049;
    MNT_Port = 20048;
}}
NFSV4 {{
    Graceless = true;
    RecoveryBackend = fs;
    RecoveryRoot = /var/lib/nfs/ganesha;
}}
LOG {{
    Default_Log_Level = EVENT;
}}
%include "/etc/ganesha/exports.conf"
"""


def write_files(cfg: LabConfig, host: HostConfig) -> None:
    etc = host.outside("/etc/ganesha")
    (etc / "ganesha.conf").write_text(GANESHA_CONF.format(name=host.name, address=host.address))
    (etc / "exports.conf").write_text("# no exports\n")
    (etc / "server-address").write_text(host.address + "\n")
    (host.outside("/var/lib/nfs") / "ganesha").mkdir(parents=True, exist_ok=True)
    exportfs = host.outside("/usr/local/sbin") / "exportfs"
    exportfs.write_bytes((cfg.bin_dir / "exportfs").read_bytes())
    exportfs.chmod(0o755)


def start(cfg: LabConfig, host: HostConfig, pids: PidRegistry) -> subprocess.Popen[bytes]:
    rpcbind = spawn(
        pids,
        "rpcbind",
        host.name,
        host_argv(host, ["/usr/sbin/rpcbind", "-f", "-w"]),
        cfg.log_dir / f"{host.name}-rpcbind.log",
        env=HOST_ENV,
    )
    wait_for(
        "rpcbind",
        unix_socket_ready(host.outside("/run/rpcbind.sock")),
        alive=lambda: rpcbind.poll() is None,
    )
    return spawn(
        pids,
        "ganesha",
        host.name,
        host_argv(
            host,
            [
                "/usr/bin/ganesha.nfsd",
                "-F",
                "-f",
                "/etc/ganesha/ganesha.conf",
                "-L",
                "/var/log/ganesha/ganesha.log",
                "-p",
                "/run/ganesha/ganesha.pid",
                "-N",
                "NIV_EVENT",
            ],
        ),
        cfg.log_dir / f"{host.name}-ganesha.log",
        env=HOST_ENV,
    )


def wait_ready(host: HostConfig, proc: subprocess.Popen[bytes]) -> None:
    wait_for(
        "NFS-Ganesha (port 2049)",
        tcp_port_ready(host.netns_path, host.address, 2049),
        alive=lambda: proc.poll() is None,
        timeout=30,
    )

    def mountd_ready() -> bool:
        out = run(host_argv(host, ["showmount", "-e", host.address]), check=False, env=HOST_ENV)
        return out.returncode == 0

    wait_for("NFS-Ganesha MOUNT service", mountd_ready, alive=lambda: proc.poll() is None)
    wait_for("ganesha pid file", lambda: host.outside("/run/ganesha/ganesha.pid").exists())


def reset(host: HostConfig) -> None:
    """No exports: bare /etc/exports, empty exports.d, empty live table (ganesha reloaded)."""
    from kvmstate.lab.hosts import restore_bare_files

    restore_bare_files(host)
    in_host(host, ["find", "/etc/exports.d", "-mindepth", "1", "-delete"])
    in_host(host, ["exportfs", "-ra"])
