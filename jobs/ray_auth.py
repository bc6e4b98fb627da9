"""A Ray Jobs API client with token authentication, and CLI error handling that never shows the token.

Ray 2.60 clusters started with `ray start` require a token on every Jobs API request. The
token comes from `--token-file` or the environment (`RAY_AUTH_TOKEN`) and is sent as
`Authorization: Bearer <token>`: Ray's client leaves a caller's own Authorization header
alone (`get_auth_headers_if_auth_enabled`), so this works whatever RAY_AUTH_MODE the client
process has. With neither, Ray's own lookup applies (RAY_AUTH_MODE=token with
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token). The token is never printed: every error message
that reaches the user goes through `redact`. `submit_job` submits through the client, retried while a
just-started head has no job agent yet.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import click

TOKEN_ENV = "RAY_AUTH_TOKEN"
ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"
REDACTED = "<redacted>"
log = logging.getLogger(__name__)


def load_token(token_file: str | None) -> str | None:
    """The cluster token: the file's content (stripped) if given, else $RAY_AUTH_TOKEN, else None."""
    if token_file:
        try:
            token = Path(token_file).expanduser().read_text().strip()
        except OSError as err:
            raise click.UsageError(f"--token-file {token_file}: cannot read it ({type(err).__name__})") from None
        if not token:
            raise click.UsageError(f"--token-file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def redact(text: str, token: str | None) -> str:
    """`text` with every occurrence of the token replaced."""
    return text.replace(token, REDACTED) if token else text


def normalize_address(address: str) -> str:
    """The Jobs API URL: `HEAD:8265` -> `http://HEAD:8265`, no trailing slash."""
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise click.UsageError(f"--address {address!r}: give the head's Jobs API URL, e.g. http://HEAD:8265 "
                               "(the dashboard port, not the GCS port or ray://)")
    return address


def job_client(address: str, token: str | None):
    """A JobSubmissionClient for `address` sending the token; raises click errors that say what is wrong."""
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    with cli_errors(token, address):
        return JobSubmissionClient(normalize_address(address), headers=headers)


def submit_job(client, retry_s: float = 60.0, **kwargs) -> str:
    """client.submit_job, retried while a just-started head has no job agent yet."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            log.info("the head has no job agent yet; retrying")
            time.sleep(2)


@contextlib.contextmanager
def cli_errors(token: str | None, address: str = "") -> Iterator[None]:
    """Turn the Jobs API's known failures into a one-line click error (exit 1), token redacted."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "authentication failed"
        raise click.ClickException(redact(
            f"{first} at {address}: the cluster wants its token; give it in ${TOKEN_ENV} or with --token-file "
            f"(on the head: `ray get-auth-token`)", token)) from None
    except (ConnectionError, requests.ConnectionError, requests.Timeout) as err:
        raise click.ClickException(redact(
            f"cannot reach the Ray Jobs API at {address} ({type(err).__name__}): is the head running and is this "
            "its dashboard address (default port 8265)?", token)) from None
    except RuntimeError as err:  # the SDK's "Request failed with status code ..." and job-not-found errors
        raise click.ClickException(redact(str(err).strip(), token)) from None
