"""kvmstate: a KVM cluster from one desired-state file."""

__version__ = "0.1.0"
