"""asyncssh, imported once without the deprecation warning cryptography 51 raises when asyncssh
2.24 imports its DSA classes (pyca/cryptography#15597). pgbridge never offers or accepts DSA
keys; the warning says nothing an operator can act on, yet would print a line that is not
JSON on the daemon's stderr at every start. Only that warning, by message and module, is
ignored, and only during this import; every other warning reaches the log
(:func:`daemon.logs.configure` captures warnings). Remove this module once an asyncssh release
no longer imports DSA at import time (pyproject.toml keeps the matching test filter).
"""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="DSA is deprecated", category=UserWarning,
                            module=r"asyncssh\.")
    import asyncssh

__all__ = ["asyncssh"]
