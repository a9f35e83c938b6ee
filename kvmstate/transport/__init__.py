"""Transports: how kvmstate reaches hosts (a shell, libvirt). Protocols in ``base``."""
