"""Where a pull's bytes come from: `https://…/x.gguf` as it is, or `hf://OWNER/REPO/FILE`
resolved through huggingface_hub (HF_ENDPOINT, HF_TOKEN), which also names the file's
size and, for LFS files, its sha256.

Only http and https reach the network: `file://` and every other scheme are refused here,
and by the downloader on each redirect."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

WEB_SCHEMES = ("http", "https")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# hf://OWNER/REPO[@REVISION]/PATH/IN/REPO (a branch, tag or commit without slashes)
HF_SOURCE = re.compile(r"^hf://([\w.-]+/[\w.-]+)(?:@([\w.-]+))?/(.+)$")


class PullError(ValueError):
    """A pull that cannot start or finish: the operator's input or the remote's answer."""


@dataclass(slots=True, frozen=True)
class Remote:
    """A source resolved to one URL to GET. `headers` go only to `url`'s origin (the hub's
    token never follows a redirect to a CDN); `sha256` and `size` are what the remote says
    of the file, when it says."""

    url: str
    shown: str
    file_name: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    size: int | None = None
    sha256: str | None = None
    identity: str = ""  # what must not change for a partial file to be resumed


def shown_url(url: str) -> str:
    """The URL without credentials or query (signed URLs, `?token=`): for logs and views."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_web_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme.lower() not in WEB_SCHEMES or not parts.hostname:
        raise PullError(f"only http(s) and hf:// sources can be pulled, not {shown_url(url)!r}")
    return url


def file_name_of(source: str) -> str:
    """The last path segment of a source: what a pulled model is named after by default."""
    if source.startswith("hf://"):
        return parse_hf(source)[2].rsplit("/", 1)[-1]
    check_web_url(source)
    return urlsplit(source).path.rsplit("/", 1)[-1]


def parse_hf(source: str) -> tuple[str, str, str]:
    """`hf://OWNER/REPO[@REVISION]/FILE` → (repo id, revision, file path in the repo)."""
    match = HF_SOURCE.match(source)
    if match is None or ".." in match[3].split("/"):
        raise PullError("a Hugging Face source is hf://OWNER/REPO/FILE.gguf "
                        "(or hf://OWNER/REPO@REVISION/FILE.gguf)")
    return match[1], match[2] or "main", match[3]


def resolve(source: str, timeout: float = 30.0) -> Remote:
    """Ask the remote what `source` is (blocking: run it in a worker thread)."""
    if source.startswith("hf://"):
        return resolve_hf(source, timeout)
    url = check_web_url(source)
    return Remote(url, shown_url(url), file_name_of(url), identity=shown_url(url))


def resolve_hf(source: str, timeout: float) -> Remote:
    """One HEAD on the hub's `/{repo}/resolve/{revision}/{file}` through huggingface_hub,
    which follows redirects that stay on the hub and stops at a CDN's: the answer's
    X-Linked-Size and X-Linked-Etag (an LFS file's sha256) or Content-Length and ETag say
    what the file is, and Location where its bytes are."""
    from huggingface_hub import get_hf_file_metadata, get_token, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    repo_id, revision, file_path = parse_hf(source)
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now, not at import
    url = hf_hub_url(repo_id, file_path, revision=revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, timeout=timeout)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "no answer"
        raise PullError(f"the hub refused {source} (HTTP {status})") from None
    except Exception as exc:  # refused, timed out, offline mode: named by class, per version
        raise PullError(f"the hub is not answering for {source} ({type(exc).__name__})") from None
    location = check_web_url(meta.location)
    token = get_token() if origin(location) == origin(url) else None
    etag = (meta.etag or "").lower()
    return Remote(location, source, file_path.rsplit("/", 1)[-1],
                  {"authorization": f"Bearer {token}"} if token else {},
                  meta.size, etag if SHA256.match(etag) else None,
                  identity=f"{source}@{meta.commit_hash}:{etag}")


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port
