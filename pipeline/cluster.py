"""Ray for the driver: start a local Ray bound to 127.0.0.1, or join a cluster; keep Ray Data's log lines off the
terminal.

The local default binds every listener to 127.0.0.1 (shared/SERVICES.md) and makes a token of its own, so
~/.ray/auth_token stays untouched; `address` (or $RAY_ADDRESS, set for a Ray Jobs entrypoint) joins a running
cluster with the token of the environment.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import sys

log = logging.getLogger(__name__)


def connect_ray(address: str | None, verbose: bool = False) -> bool:
    """Start (address None) or join a Ray cluster unless one is connected; True if we must shut it down.

    $RAY_ADDRESS (set for a Ray Jobs entrypoint) counts as `address`."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        # keep the node IP (and so every listener) on loopback: see shared/SERVICES.md
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # a per-run token, so ~/.ray/auth_token stays untouched; ray reads these when imported, so
        # only before that (a token given to a cluster but not to this driver would lock us out)
        if "RAY_AUTH_TOKEN" not in os.environ and "ray" not in sys.modules:
            os.environ.setdefault("RAY_AUTH_MODE", "token")
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    import ray

    if ray.is_initialized():
        return False
    if address:
        context = ray.init(address=address, log_to_driver=False,
                           logging_level=logging.INFO if verbose else logging.WARNING)
        log.info("Ray: joined the cluster at %s", context.address_info["gcs_address"])
        return True
    context = ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                       logging_level=logging.INFO if verbose else logging.WARNING)
    log.info("Ray: started a local cluster at %s", context.address_info["gcs_address"])
    return True


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's log lines (the execution plan, tips) go to its log file in the Ray session's logs directory, not
    the terminal, unless `verbose`."""
    importlib.import_module("ray.data")  # its import sets up its handlers: its log file and the console
    for handler in logging.getLogger("ray.data").handlers:
        if handler.__class__.__name__ == "PlainRayHandler":  # the console one; the file handler stays
            handler.setLevel(logging.INFO if verbose else logging.CRITICAL + 1)
