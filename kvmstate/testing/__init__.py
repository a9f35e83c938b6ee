"""Test doubles of kvmstate: the in-memory fake cluster (``fake``) and the commands it emulates
(``fake_cmds``). Nothing in kvmstate's run path imports this package."""
