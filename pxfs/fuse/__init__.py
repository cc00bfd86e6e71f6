"""The FUSE side of pxfs: the only place that imports pyfuse3.

``_lockops`` (the lock requests pyfuse3 has no handlers for) is loaded
first, with RTLD_GLOBAL, so that pyfuse3's call to libfuse's
fuse_session_new() binds to it; see _lockops.c.
"""

import os as _os
import sys as _sys

if "pyfuse3" in _sys.modules:               # too late to see its session being made
    _lockops = None
else:
    _flags = _sys.getdlopenflags()
    _sys.setdlopenflags(_flags | _os.RTLD_GLOBAL)
    try:
        from . import _lockops
    except ImportError:                     # not built: locks stay per node
        _lockops = None
    finally:
        _sys.setdlopenflags(_flags)
