"""sdmaker's built-in S3: an S3-compatible endpoint on the daemon's port, under ``/s3``, durable on disk.

``sdmaker up`` mounts :class:`S3App` at :data:`sdmaker.config.S3_PATH_PREFIX`; its data lives in
``$SDMAKER_HOME/s3`` (:class:`ObjectStore`: a SQLite index and content-addressed blobs). Clients reach it
with ``AWS_ENDPOINT_URL_S3=http://127.0.0.1:<port>/s3`` (``sdmaker env`` exports that when the user has no
S3 endpoint of their own).

Weighed before writing it: moto (in memory: its server loses every object on exit), LocalStack (an S3 whose
persistence snapshots state on shutdown, so a kill -9 loses writes; a large runtime to embed), MinIO,
SeaweedFS, Garage, RustFS (not Python: separate binaries to ship and supervise) and the small Python
S3 routers on PyPI (in-memory or unmaintained). None is a durable, kill -9 safe S3 that mounts into the
daemon, so this is a small implementation of the operations boto3 and the SageMaker SDK use.
"""

from sdmaker.serving.s3._app import S3App, Verifier, mount_s3
from sdmaker.serving.s3._objects import BlobWriter, Listing, ObjectInfo, ObjectStore, Part, Upload

__all__ = ["BlobWriter", "Listing", "ObjectInfo", "ObjectStore", "Part", "S3App", "Upload", "Verifier", "mount_s3"]
