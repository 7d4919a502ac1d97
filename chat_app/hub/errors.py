"""Hub errors in words: every failure is a `HubError` whose message says what to do next, and
`translate` / `hub_errors` turn huggingface_hub's typed HTTP errors and httpx2's transport errors into them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx2
from huggingface_hub import errors as hf_errors

from chat_app.errors import UserError

EXAMPLE_REPO = "mistralai/Mixtral-8x7B-Instruct-v0.1"
LOGIN_HINT = "set HF_TOKEN or run `hf auth login`, or type a token"
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
# What talking to the hub can raise (huggingface_hub's typed HTTP errors, bad ids, offline mode, transport errors).
HUB_ERRORS = (
    hf_errors.HfHubHTTPError,
    hf_errors.HFValidationError,
    hf_errors.OfflineModeIsEnabled,
    httpx2.TransportError,
)


class HubError(UserError):
    """A hub or download failure. The message says what to do next."""


class GatedRepoError(HubError):
    """The repo is gated and this account (or no account) has not been granted access; see `access_url`."""

    def __init__(self, message: str, access_url: str):
        super().__init__(message)
        self.access_url = access_url


class AuthError(HubError):
    """The hub rejected the token, or the token lacks a permission."""


class RepoNotFoundError(HubError):
    """No such repo (or it is private and the token cannot see it), or the id is malformed."""


class RevisionNotFoundError(HubError):
    """The repo has no such branch, tag or commit."""


class UnsupportedRepoError(HubError):
    """The repo is not a transformers checkpoint with safetensors weights, config.json and a tokenizer."""


class NetworkError(HubError):
    """The hub could not be reached, or the connection was lost; what was downloaded is kept."""


class DiskSpaceError(HubError):
    """Not enough free disk space (refused before starting, or the disk filled up); partial data is kept."""


class ChecksumError(HubError):
    """A file's content does not match the hub's hash; the bad copy has been deleted."""


class DownloadCancelled(HubError):
    """`should_cancel` returned True; what was downloaded is kept."""


def is_transient(error: Exception) -> bool:
    """Worth retrying: the connection failed or dropped, or the hub is overloaded or briefly down."""
    if isinstance(error, hf_errors.HfHubHTTPError):
        return error.response is not None and error.response.status_code in TRANSIENT_STATUS
    return isinstance(error, httpx2.TransportError)


def describe(error: Exception) -> str:
    if isinstance(error, hf_errors.HfHubHTTPError) and error.response is not None:
        return f"the hub answered HTTP {error.response.status_code}"
    return str(error) or type(error).__name__


@contextmanager
def hub_errors(**where) -> Iterator[None]:
    """Turn huggingface_hub / HTTP errors raised inside into HubErrors; `where`: see `_translate`."""
    try:
        yield
    except HUB_ERRORS as error:
        raise translate(error, **where) from error


def translate(error: Exception, *, repo_id: str, revision: str, endpoint: str, token: str | None) -> HubError:
    """The HubError for a huggingface_hub or httpx2 error, with a message that says what to do."""
    repo_url = f"{endpoint}/{repo_id}"
    if isinstance(error, hf_errors.GatedRepoError):  # (a subclass of RepositoryNotFoundError: test it first)
        if token is None:
            message = (
                f"{repo_id} is a gated model: only accounts granted access may download it. Request access at "
                f"{repo_url}, then {LOGIN_HINT}."
            )
        else:
            message = (
                f"Your Hugging Face account has not been granted access to {repo_id} yet. Request access at "
                f"{repo_url} (some authors review requests by hand), then try again."
            )
        return GatedRepoError(message, access_url=repo_url)
    if isinstance(error, hf_errors.RevisionNotFoundError):
        return RevisionNotFoundError(
            f"{repo_id} has no branch, tag or commit named '{revision}'. Check the revision, or leave it out to "
            "use 'main'."
        )
    if isinstance(error, hf_errors.RepositoryNotFoundError):
        if token is None:
            private = f"If it is private, {LOGIN_HINT}."
        else:
            private = "If it is private, check that your token's account can read it."
        return RepoNotFoundError(
            f"There is no model repo '{repo_id}' on {endpoint}. Check the name (it looks like org/name, e.g. "
            f"{EXAMPLE_REPO}). {private}"
        )
    if isinstance(error, hf_errors.HFValidationError):
        return RepoNotFoundError(f"'{repo_id}' is not a valid repo id: it looks like org/name, e.g. {EXAMPLE_REPO}.")
    if isinstance(error, hf_errors.OfflineModeIsEnabled):
        return NetworkError(f"HF_HUB_OFFLINE is set, so nothing can be downloaded: unset it to download {repo_id}.")
    if isinstance(error, hf_errors.HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        server_says = f" The hub said: {error.server_message}" if error.server_message else ""
        if status == 401:
            return AuthError(
                f"The Hugging Face hub rejected your token (it is invalid, expired or revoked). Create a read "
                f"token at {endpoint}/settings/tokens, then {LOGIN_HINT}."
            )
        if status == 403:
            return AuthError(
                f"Your token is not allowed to read {repo_id}.{server_says} Use a token with read access (for a "
                "fine-grained token, allow reading public gated repos), then try again."
            )
        if status == 429:
            return NetworkError("The hub is limiting how fast you can download: wait a few minutes and try again.")
        if status >= 500:
            return NetworkError(f"The Hugging Face hub is having trouble (HTTP {status}): try again in a few minutes.")
        return HubError(f"The hub refused the request for {repo_id} (HTTP {status}).{server_says}")
    return NetworkError(
        f"Could not reach {endpoint} ({describe(error)}). Check your internet connection and proxy settings, "
        "then try again."
    )
