"""The admin console: server-rendered pages at /console over the services /admin/v1 uses.

`install` mounts it; `web.py` holds what every page shares (sign-in, CSRF, rendering,
navigation); `routes/` has one module per page group.
"""

from __future__ import annotations

from aicloud.console.mount import install

__all__ = ["install"]
