"""s3fs with its own retry loop reduced to one attempt.

s3fs retries connection errors five times with its own sleeps, under
botocore's retries; muxgate retries once, at the top, under a bounded
:class:`~muxgate.backends.RetryPolicy`. A subclass (rather than mutating
``retries`` on a shared instance) keeps fsspec's instance cache separate from
plain s3fs users in the same process. Importing this module imports s3fs, so
a missing s3fs surfaces as "Install s3fs to access s3:// URLs".
"""

from __future__ import annotations

from s3fs import S3FileSystem as _BaseS3FileSystem


class S3FileSystem(_BaseS3FileSystem):  # type: ignore[misc]
    """``s3fs.S3FileSystem`` making one attempt per call."""

    retries = 1
