"""asyncssh, imported once, with its third-party deprecation noise filtered precisely.

asyncssh touches the DSA names of ``cryptography`` when it is imported; cryptography 48 and
newer answer every such touch with a ``CryptographyDeprecationWarning`` (ten lines on stderr in
every new process, and so a mail from every cron run of a clean cluster). That warning is about
asyncssh's code, not about anything a kvmstate user can change. It is ignored here, and only
for that category raised from asyncssh's own modules: kvmstate's own warnings, and every other
library's, still reach the user. Import asyncssh through this module (``from
kvmstate.transport.sshlib import asyncssh``), never directly.
"""

from __future__ import annotations

import warnings

try:
    from cryptography.utils import CryptographyDeprecationWarning
except ImportError:  # pragma: no cover - a cryptography without the class warns nothing
    pass
else:
    warnings.filterwarnings(
        "ignore", category=CryptographyDeprecationWarning, module=r"asyncssh(\..*)?$"
    )

import asyncssh as asyncssh

__all__ = ["asyncssh"]
