"""Serve the mirror read-only to LAN peers under /mirror/ (metadata/ and targets/ files only).

The app owner calls :func:`register_mirror_routes`; the routes read the
generation in force through the same no-follow opener the importer uses, so
a peer gets exactly the verified repository and nothing else of the host
(T-SUPPLY-1). No directory is ever listed.
"""
from __future__ import annotations

import os

from flask import Blueprint, Flask, Response, abort, send_file

from mirror.checks import UnsafePath, split_relative_path
from mirror.registry import Mirror

_TYPES = {"metadata": "application/json", "targets": "application/octet-stream"}


def mirror_response(mirror: Mirror, subpath: str) -> Response:
    from mirror.fetcher import open_confined  # start-up: the fetcher loads the TUF client (urllib3); first request only

    try:
        parts = split_relative_path(subpath)
    except UnsafePath:
        abort(404)  # '../', absolute, dot files: indistinguishable from missing
    if len(parts) != 2 or parts[0] not in _TYPES:
        abort(404)  # only files directly in metadata/ or targets/, never a listing
    try:
        fd = open_confined(mirror.current_dir, parts)
    except (FileNotFoundError, UnsafePath, NotADirectoryError):
        abort(404)
    f = os.fdopen(fd, "rb")
    resp = send_file(f, mimetype=_TYPES[parts[0]], etag=False, conditional=False, max_age=0)
    resp.headers["X-Content-Type-Options"] = "nosniff"
    # Metadata changes with every import; content-addressed blobs never do.
    resp.headers["Cache-Control"] = "no-cache" if parts[0] == "metadata" else "public, max-age=86400"
    return resp


def mirror_blueprint(mirror: Mirror) -> Blueprint:
    """GET /mirror/<metadata|targets>/<file>; everything else under /mirror is 404."""
    bp = Blueprint("mirror", __name__)

    def serve(subpath: str) -> Response:
        return mirror_response(mirror, subpath)

    def nothing() -> Response:
        abort(404)

    # merge_slashes=False: '/mirror//etc/passwd' is a plain 404, not a redirect.
    bp.add_url_rule("/mirror/<path:subpath>", "mirror_file", serve, methods=["GET"], merge_slashes=False)
    bp.add_url_rule("/mirror/", "mirror_index", nothing, methods=["GET"])
    bp.add_url_rule("/mirror", "mirror_bare", nothing, methods=["GET"])
    return bp


def register_mirror_routes(app: Flask, mirror: Mirror) -> None:
    app.register_blueprint(mirror_blueprint(mirror))
