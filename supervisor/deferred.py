"""Stand-ins for modules that the daemon's libraries import but rarely use.

trio imports `ssl` for its TLS streams and `hmac` for DTLS cookies, and
sqlite-utils (loaded for schema migrations) imports `hashlib` and
`secrets`, which imports `hmac`. Each of them loads
OpenSSL's libcrypto, whose start-up adds about 6 MiB to the resident memory
of a daemon that opens no TLS connection and hashes nothing: a sixth of its
total.

`defer` puts a stand-in module into `sys.modules` for each name. `import
ssl` then binds the stand-in, and the first attribute read from it imports
the real module, whose names the stand-in copies (none of these modules
rebinds its globals later). Reads of dunder
names such as `__file__`, which tools make while walking `sys.modules`, do
not count as a use.
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from typing import Any

# The modules that trio and sqlite-utils import at start-up and that load
# libcrypto, directly or through `hmac`.
CRYPTO_MODULES = ("ssl", "hmac", "hashlib", "secrets")

_lock = threading.Lock()


class _Deferred(types.ModuleType):
    """A module that imports the real one on the first use of an attribute."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return getattr(self._load(), name)

    def _load(self) -> types.ModuleType:
        with _lock:
            real = sys.modules.get(self.__name__)
            if real is self or real is None:
                del sys.modules[self.__name__]
                try:
                    real = importlib.import_module(self.__name__)
                except BaseException:
                    sys.modules[self.__name__] = self
                    raise
            # Later reads find the attributes without coming back here.
            self.__dict__.update(real.__dict__)
            return real


def defer(names: tuple[str, ...] = CRYPTO_MODULES) -> list[str]:
    """Put a stand-in into `sys.modules` for each module not imported yet.

    Return the names that got one. Call it before the first import of a
    library that imports these modules.
    """
    deferred = []
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = _Deferred(name)
            deferred.append(name)
    return deferred


def is_loaded(name: str) -> bool:
    """Return whether the real module `name` has been imported."""
    module = sys.modules.get(name)
    return module is not None and not isinstance(module, _Deferred)
