"""URIs of stores and tracking servers, as text: what scheme a value has, whether it is a
remote store, how to join names onto it keeping its query, whether it is a shape a store can
have, and how to show it without its credentials. No I/O.
"""
from __future__ import annotations

import os
import re
import urllib.parse

SECRET_QUERY_KEYS = {"access_key", "secret_key", "session_token", "password", "token", "sig", "signature"}
# ----------------------------------------------------------------------------- URIs
# What store.uri (exp.dir, compare.other, api.open) may be: a local path, file:///abs/path, or a
# bucket of an object store. Anything else that looks like a URI is refused (`uri_problem`), never
# taken for a local path: `s3://` without its bucket once ran a whole experiment into ./s3:/.
OBJECT_SCHEMES = ("s3", "gs", "gcs")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$", re.S)
# schemes that a value meant as a URI starts with even when its // is missing (s3:bucket/x)
_URI_WORDS = OBJECT_SCHEMES + ("file", "http", "https", "hdfs", "viewfs", "abfs", "abfss", "az", "wasb", "wasbs",
                               "adl", "ftp", "sftp", "ssh", "mock", "memory", "minio", "r2", "oss", "cos")
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SHAPES = "a local directory, s3://BUCKET/prefix or gs://BUCKET/prefix"


def uri_scheme(uri: str) -> str | None:
    """The scheme of a URI (`scheme://...`), lower case; None for a local path."""
    m = _SCHEME.match(str(uri))
    return m.group(1).lower() if m and m.group(2).startswith("//") else None


def is_remote(uri: str) -> bool:
    """An object store (s3://, gs://), not a local directory (a path or file://)."""
    return uri_scheme(uri) in OBJECT_SCHEMES


def uri_problem(uri: str) -> str | None:
    """What is wrong with `uri` as the place of a store, as the end of a sentence that begins
    with the setting and its value (`store.uri=s3:// has no bucket; ...`); None when it is a
    local path, file:///abs/path, s3://BUCKET[/prefix] or gs://BUCKET[/prefix]."""
    text = str(uri)
    if not text.strip():
        return f"is empty; give {SHAPES}"
    if re.match(r"^[A-Za-z]:[\\/]", text) or text.startswith("\\\\"):
        return "is a Windows path; give a POSIX path (e.g. /data/runs) or s3://BUCKET/prefix"
    m = _SCHEME.match(text)
    uri_like = m is not None and (m.group(2).startswith("/") or m.group(1).lower() in _URI_WORDS)
    if m is None or not uri_like:
        if "://" in text:
            return f"is neither a path nor a URI (a scheme such as s3:// comes first); give {SHAPES}"
        return None
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme not in OBJECT_SCHEMES + ("file",):
        return f"has an unsupported scheme '{scheme}:'; give {SHAPES}"
    if scheme == "file":
        if not rest.startswith("//"):
            return "is not a file URI: write file:///absolute/path, or the path itself"
        parts = urllib.parse.urlsplit(text)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            return "is not a file URI of an absolute path: write file:///absolute/path, or the path itself"
        if parts.query or parts.fragment:
            return "has a ? or # in a file URI: write the path itself"
        return None
    example = f"{scheme}://BUCKET/prefix"
    if not rest.startswith("//"):
        return f"is not {'an' if scheme == 's3' else 'a'} {scheme} URI: write {example}"
    parts = urllib.parse.urlsplit(text)
    bucket = parts.netloc.rsplit("@", 1)[-1]
    if not bucket:
        return f"has no bucket; write {example}"
    if ":" in bucket:
        return (f"has a port in its bucket name '{bucket}'; write {example}, with the server in "
                f"?endpoint_override=HOST:PORT")
    if not _BUCKET.match(bucket):
        return f"has '{bucket}', which is not a bucket name; write {example}"
    if any(seg in (".", "..") for seg in parts.path.split("/")):
        return f"has a '.' or '..' in its path; write {example} with plain names"
    return None


def local_path(uri: str) -> str:
    """The absolute path of a local store given as a path or file:///abs/path."""
    uri = str(uri)
    if uri_scheme(uri) == "file":
        return os.path.abspath(urllib.parse.unquote(urllib.parse.urlsplit(uri).path))
    return os.path.abspath(uri)


def redact(uri: str) -> str:
    """The URI with user info and secret query values replaced by ***: safe for logs, MLflow
    and summary.json. A URI with nothing to hide comes back unchanged, character for
    character (no re-encoding: `sqlite:////abs/path` keeps its four slashes)."""
    uri = str(uri)
    if "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    # user info: what precedes an @ in the authority (before the first / ? or #)
    authority = re.match(r"[^/?#]*", rest).group(0)  # type: ignore[union-attr]  # always matches
    if "@" in authority:
        rest = "***@" + rest[len(authority.rsplit("@", 1)[0]) + 1:]
    if "?" in rest:
        head, _, query = rest.partition("?")
        query, hash_, fragment = query.partition("#")

        def hide(m: re.Match) -> str:
            key = urllib.parse.unquote_plus(m.group(2))
            return f"{m.group(1)}{m.group(2)}=***" if key.lower() in SECRET_QUERY_KEYS else m.group(0)
        query = re.sub(r"(^|&)([^&=]*)=([^&]*)", hide, query)
        rest = f"{head}?{query}{hash_}{fragment}"
    return f"{scheme}://{rest}"


def join(uri: str, *names: str) -> str:
    """`uri`/names..., keeping a URI's query string (endpoint options) at the end."""
    uri = str(uri)
    if not is_remote(uri):
        return os.path.join(uri, *names)
    parts = urllib.parse.urlsplit(uri)
    path = "/".join([parts.path.rstrip("/")] + [n.strip("/") for n in names])
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))
