"""The kvmstate lab: a real multi-host KVM cluster on one machine (``kvmstate lab ...``).

One storage host and N >= 2 KVM hosts, each a network + mount + UTS namespace on a bridge
(10.77.0.0/24) with its own sshd; KVM hosts run their own libvirtd; the storage host has a
btrfs filesystem on a loop file and NFS-Ganesha driven by /etc/exports + ``exportfs``; the
KVM hosts mount NFS through the project's userspace NFSv3 client (:mod:`kvmstate.lab.nfsfuse`).

Entry points: :class:`kvmstate.lab.lab.Lab` (Python API), :func:`kvmstate.lab.cli.main` (CLI),
:mod:`kvmstate.lab.testing` (pytest fixtures ``lab`` and ``bare_lab``). Importing this package
is cheap: nothing here touches the system.
"""
