"""Batch transform jobs (CreateTransformJob): a model's own worker pool over every record of S3 input files.

As SageMaker does for a job, the daemon starts the job's ``ModelName`` on its own workers
(``TransformResources.InstanceCount`` of them, the same worker code as endpoints, so the default
handler's step batching applies), asks a worker ``GET /execution-parameters`` for defaults, then sends
each unit as ``POST /invocations``: one record (``SingleRecord``) or as many lines as fit in
``MaxPayloadInMB`` (``MultiRecord``), up to ``MaxConcurrentTransforms`` per worker at once. Each input
file ``<prefix>/<name>`` gives one object ``<S3OutputPath>/<name>.out`` with its records' outputs in
input order (``AssembleWith: Line`` ends each with a newline).

Failures follow AWS: a record the model refuses (after ``InvocationsMaxRetries`` retries for server-side
errors) fails its file only; the other files go on and the job ends ``Failed`` with a FailureReason
naming the file and the record.

For a model on the default handler, a JSON record's ``image``/``mask_image`` may be an ``s3://`` (or allowed URL)
reference: the daemon fetches it before the record goes to a worker (:mod:`._image_refs`); a reference that cannot
be fetched fails its record, named in the error.

Durability (nothing finished is computed twice, nothing half-written is visible): each finished unit's
output goes to a spool file (temp file + ``os.replace``) and then a row in :mod:`._transform_state`; a file's
``.out`` object is uploaded once every unit is spooled (one PUT: complete or absent). A daemon restart,
kill -9 included, resumes ``InProgress`` jobs and skips the spooled units.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import logging
import shutil
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sdmaker.errors import InvocationFailedError, InvocationTimeoutError, SdmakerError
from sdmaker.files import atomic_write_bytes
from sdmaker.serving._worker_secret import auth_header
from sdmaker.serving.daemon._image_refs import ImageFetcher, resolve_record
from sdmaker.serving.daemon._pool import WorkerPool
from sdmaker.serving.daemon._standby import StandbyPool
from sdmaker.serving.daemon._state import StateDB
from sdmaker.serving.daemon._transform_state import FileRecord, FileStatus, TransformDB, TransformStatus
from sdmaker.serving.daemon._variant import model_ref, plan_variant, python_for, resolve_model_dir
from sdmaker.serving.daemon._worker_process import WorkerSpec

__all__ = ["DEFAULT_INVOCATION_TIMEOUT_S", "DEFAULT_MAX_PAYLOAD_MB", "DEFAULT_MAX_RETRIES", "ExecutionParameters",
           "RecordFailed", "TransformJobs", "describe_times", "output_key", "resolve_parameters", "split_units"]

logger = logging.getLogger(__name__)

#: AWS's defaults when neither the job nor the container's ``/execution-parameters`` say otherwise.
DEFAULT_MAX_PAYLOAD_MB = 6
DEFAULT_INVOCATION_TIMEOUT_S = 600
DEFAULT_MAX_RETRIES = 3
#: input files downloaded and worked on at once (their records share the job's concurrency)
_FILES_AT_ONCE = 4
#: a decompressed input file larger than this fails (it is held in memory while it is split)
_MAX_INPUT_BYTES = 1024 * 1024 * 1024


class RecordFailed(Exception):
    """A unit the model refused (or that failed every retry): it fails its file."""


@dataclass(frozen=True)
class ExecutionParameters:
    """What the job runs with: its own settings, else the container's ``/execution-parameters``, else AWS's."""

    batch_strategy: str
    max_concurrent: int
    max_payload_mb: int

    def to_dict(self) -> dict[str, Any]:
        return {"BatchStrategy": self.batch_strategy, "MaxConcurrentTransforms": self.max_concurrent,
                "MaxPayloadInMB": self.max_payload_mb}


def resolve_parameters(body: dict[str, Any], container: dict[str, Any] | None) -> ExecutionParameters:
    """The job's BatchStrategy / MaxConcurrentTransforms / MaxPayloadInMB: set (non-zero) values win, then the
    container's answer, then AWS's defaults (1 concurrent transform, 6 MB; sdmaker sends ``SingleRecord``)."""
    container = container or {}

    def pick(key: str, default: Any) -> Any:
        value = body.get(key)
        if value not in (None, 0, ""):
            return value
        offered = container.get(key)
        return offered if offered not in (None, 0, "") else default

    strategy = str(pick("BatchStrategy", "SingleRecord"))
    if strategy not in ("SingleRecord", "MultiRecord"):
        strategy = "SingleRecord"
    concurrent = pick("MaxConcurrentTransforms", 1)
    payload = pick("MaxPayloadInMB", DEFAULT_MAX_PAYLOAD_MB)
    concurrent = int(concurrent) if isinstance(concurrent, int) and not isinstance(concurrent, bool) else 1
    payload = int(payload) if isinstance(payload, int) and not isinstance(payload, bool) else DEFAULT_MAX_PAYLOAD_MB
    return ExecutionParameters(strategy, max(1, min(concurrent, 1024)), max(1, min(payload, 100)))


def split_units(data: bytes, split_type: str, strategy: str, max_payload_bytes: int) -> list[tuple[bytes, int, int]]:
    """Cut one input file into the request bodies the worker sees: ``(body, first record, record count)``.

    ``SplitType: Line`` makes each non-empty line a record (a trailing ``\\r`` is dropped); ``None`` makes
    the whole file one record. ``MultiRecord`` packs consecutive lines, newline-joined, up to
    ``max_payload_bytes``. A record larger than ``max_payload_bytes`` raises :class:`RecordFailed`.
    """
    if split_type != "Line":
        if len(data) > max_payload_bytes:
            raise RecordFailed(f"record 1 is {len(data)} bytes, more than MaxPayloadInMB allows "
                               f"({max_payload_bytes} bytes)")
        return [(data, 0, 1)]
    records = [line.rstrip(b"\r") for line in data.split(b"\n")]
    records = [r for r in records if r.strip()]
    for i, record in enumerate(records):
        if len(record) > max_payload_bytes:
            raise RecordFailed(f"record {i + 1} is {len(record)} bytes, more than MaxPayloadInMB allows "
                               f"({max_payload_bytes} bytes)")
    if strategy != "MultiRecord":
        return [(r, i, 1) for i, r in enumerate(records)]
    units: list[tuple[bytes, int, int]] = []
    start, size = 0, 0
    for i, record in enumerate(records):
        extra = len(record) + (1 if i > start else 0)
        if i > start and size + extra > max_payload_bytes:
            units.append((b"\n".join(records[start:i]), start, i - start))
            start, size, extra = i, 0, len(record)
        size += extra
    if records:
        units.append((b"\n".join(records[start:]), start, len(records) - start))
    return units


def output_key(output_path: str, relative: str) -> tuple[str, str]:
    """``(bucket, key)`` of the ``.out`` object of the input file ``relative`` (path below the input prefix)."""
    from sdmaker.store import parse_s3_uri

    bucket, prefix = parse_s3_uri(output_path)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, f"{prefix}{relative}.out"


def _error_text(body: bytes, status: int) -> str:
    """The model's own message from a worker's error body (MMS JSON), else the start of the body."""
    try:
        payload = json.loads(body)
        if isinstance(payload, dict) and payload.get("message"):
            return f"{status}: {str(payload['message'])[:512]}"
    except ValueError:
        pass
    return f"{status}: {body[:512].decode('utf-8', errors='replace')}"


class TransformJobs:
    """Runs, resumes and stops batch transform jobs (one per daemon; lives on the endpoint manager).

    Args:
        models: the daemon's state (``CreateModel`` records).
        root: the daemon's endpoints folder; jobs keep ``transform.sqlite3`` and ``transform-jobs/<name>/``
            (job log and spool) there.
        make_client: builds the boto3 S3 client (tests may pass their own).
    """

    def __init__(self, settings: Any, models: StateDB, root: Path, standbys: StandbyPool | None = None, *,
                 make_client: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self.models = models
        self.root = root / "transform-jobs"
        self.db = TransformDB(root / "transform.sqlite3")
        self.standbys = standbys
        self._make_client = make_client
        self._client: Any = None
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping: set[str] = set()
        self._closed = False
        #: worker processes the running jobs hold; a job waits until its InstanceCount fits under the cap
        self._workers_held = 0
        self._room: asyncio.Condition | None = None
        #: jobs whose model runs on the default handler: their records' image references are fetched
        self._default_handler: set[str] = set()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Resume the jobs that were running when the daemon stopped; finish stopping those being stopped."""
        for job in self.db.jobs():
            if job.status is TransformStatus.STOPPING:
                self._finish(job.name, TransformStatus.STOPPED, None)
            elif job.status is TransformStatus.IN_PROGRESS:
                logger.info("resuming transform job %s", job.name)
                self._log(job.name, "daemon restarted: resuming the job (finished records are kept)")
                self._launch(job.name)

    async def close(self) -> None:
        """Stop running jobs without changing their status: the next daemon start resumes them."""
        self._closed = True
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.db.close()

    # -- operations ----------------------------------------------------------------------------------

    def create(self, name: str, body: dict[str, Any]) -> bool:
        """Store the job (``InProgress``) and start it; False when the name is taken."""
        if not self.db.add_job(name, body):
            return False
        self._log(name, f"transform job created for model {body.get('ModelName')}")
        self._launch(name)
        return True

    def stop(self, name: str) -> None:
        """StopTransformJob: ``Stopping`` now, ``Stopped`` once the job's workers are gone."""
        job = self.db.job(name)
        if job is None or job.status is not TransformStatus.IN_PROGRESS:
            return
        self.db.set_job(name, status=TransformStatus.STOPPING)
        self._log(name, "stop requested")
        self._stopping.add(name)
        task = self.tasks.get(name)
        if task is None:
            self._finish(name, TransformStatus.STOPPED, None)
        else:
            task.cancel()

    def log_file(self, name: str) -> Path:
        return self.root / name / "job.log"

    # -- running -------------------------------------------------------------------------------------

    def _launch(self, name: str) -> None:
        task = asyncio.create_task(self._run(name), name=f"transform-{name}")
        self.tasks[name] = task
        task.add_done_callback(lambda _t: self.tasks.pop(name, None) if self.tasks.get(name) is _t else None)

    def _finish(self, name: str, status: TransformStatus, reason: str | None) -> None:
        self.db.set_job(name, status=status, failure_reason=reason[:1024] if reason else None, ended=time.time())
        self._stopping.discard(name)
        self._default_handler.discard(name)
        self._log(name, f"transform job {status}" + (f": {reason}" if reason else ""))
        with contextlib.suppress(OSError):  # finished: nothing is resumed from the spool any more
            shutil.rmtree(self.root / name / "spool")

    def _log(self, name: str, text: str) -> None:
        path = self.log_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")

    def _s3(self) -> Any:
        if self._client is None:
            if self._make_client is not None:
                self._client = self._make_client()
            else:
                from sdmaker.store import s3

                # the user's S3 when configured, else the daemon's built-in one (called from threads only:
                # the event loop answers the built-in S3's requests)
                self._client = s3.client_for(self.settings)
        return self._client

    async def _run(self, name: str) -> None:
        pool: WorkerPool | None = None
        try:
            job = self.db.job(name)
            assert job is not None
            if job.started is None:
                self.db.set_job(name, started=time.time())
            body = job.body
            if not self.db.has_files(name):
                files = await asyncio.to_thread(self._list_inputs, body)
                self.db.set_files(name, files)
                self._log(name, f"{len(files)} input file(s)")
            async with self._instances(name, body):
                try:
                    pool, params = await self._start_pool(name, body)
                    await self._run_files(name, body, pool, params)
                finally:  # the workers are gone before the job's room is given back
                    await self._close_pool(pool)
                    pool = None
        except asyncio.CancelledError:
            if name in self._stopping:
                self._finish(name, TransformStatus.STOPPED, None)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure becomes the job's FailureReason
            reason = exc.message if isinstance(exc, SdmakerError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, (SdmakerError, RecordFailed)):
                logger.exception("transform job %s failed", name)
            self._finish(name, TransformStatus.FAILED, f"ClientError: {reason}")
            return
        failed = [f for f in self.db.files(name) if f.status is FileStatus.FAILED]
        if failed:
            total = len(self.db.files(name))
            first = failed[0]
            self._finish(name, TransformStatus.FAILED,
                         f"ClientError: {len(failed)} of {total} input file(s) failed; first: {first.key}: {first.error}")
        else:
            self._finish(name, TransformStatus.COMPLETED, None)

    @contextlib.asynccontextmanager
    async def _instances(self, name: str, body: dict[str, Any]) -> AsyncIterator[None]:
        """Hold the job's workers against ``SDMAKER_MAX_INSTANCES`` (all jobs together), waiting for room: many
        jobs at once queue instead of starting more worker processes than the machine may hold."""
        want = int((body.get("TransformResources") or {}).get("InstanceCount") or 1)
        cap = max(want, int(getattr(self.settings, "max_instances", 0) or want))
        if self._room is None:
            self._room = asyncio.Condition()
        async with self._room:
            if self._workers_held + want > cap:
                self._log(name, f"waiting for room: running jobs hold {self._workers_held} of {cap} worker(s)")
            await self._room.wait_for(lambda: self._workers_held + want <= cap)
            self._workers_held += want
        try:
            yield
        finally:
            self._workers_held -= want
            async with self._room:
                self._room.notify_all()

    @staticmethod
    async def _close_pool(pool: WorkerPool | None) -> None:
        if pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(pool.close())

    def _list_inputs(self, body: dict[str, Any]) -> list[tuple[str, str]]:
        """``(input URI, output URI)`` of every input file, in S3's key order (manifest order for a manifest)."""
        from sdmaker.errors import S3Error
        from sdmaker.store import parse_s3_uri, s3

        source = body["TransformInput"]["DataSource"]["S3DataSource"]
        uri = str(source["S3Uri"])
        out_path = str(body["TransformOutput"]["S3OutputPath"])
        client = self._s3()
        pairs: list[tuple[str, str]] = []
        if source.get("S3DataType") == "ManifestFile":
            bucket, key = parse_s3_uri(uri)
            with s3._mapped("read manifest", bucket, key):
                raw = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            try:
                manifest = json.loads(raw)
            except ValueError as exc:
                raise S3Error(f"manifest {uri} is not JSON: {exc}", uri=uri) from None
            if (not isinstance(manifest, list) or not manifest or not isinstance(manifest[0], dict)
                    or not isinstance(manifest[0].get("prefix"), str)
                    or not all(isinstance(item, str) and item for item in manifest[1:])):
                raise S3Error(f'manifest {uri} must be a JSON list: [{{"prefix": "s3://bucket/prefix/"}}, '
                              '"relative/key", ...]', uri=uri)
            prefix = manifest[0]["prefix"]
            base = prefix if prefix.endswith("/") else prefix + "/"
            parse_s3_uri(base)
            for rel in manifest[1:]:
                bucket, key = output_key(out_path, rel)
                pairs.append((base + rel, f"s3://{bucket}/{key}"))
        else:
            bucket, prefix = parse_s3_uri(uri)
            folder = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
            for key, _size, _etag in s3.list_keys(uri, client=client):
                if key.endswith("/"):
                    continue
                obucket, okey = output_key(out_path, key[len(folder):])
                pairs.append((f"s3://{bucket}/{key}", f"s3://{obucket}/{okey}"))
        if not pairs:
            raise S3Error(f"no input files found at {uri}", uri=uri)
        return pairs

    async def _start_pool(self, name: str, body: dict[str, Any]) -> tuple[WorkerPool, ExecutionParameters]:
        """The job's own workers for its model (with the job's Environment), and its execution parameters."""
        from sdmaker.errors import ConfigError

        record = self.models.get("models", str(body["ModelName"]))
        if record is None:
            raise ConfigError(f"Could not find model \"{body['ModelName']}\".", field="ModelName")
        model = json.loads(json.dumps(record.body))  # a copy: the job's Environment goes into its container
        container = model.get("PrimaryContainer") or (model.get("Containers") or [{}])[0]
        container["Environment"] = {**(container.get("Environment") or {}), **(body.get("Environment") or {})}
        model["PrimaryContainer"] = container
        ref = model_ref(container)
        self._log(name, f"resolving model data {ref}")
        model_dir, digest, display = await asyncio.to_thread(resolve_model_dir, ref, self.settings)
        python = await asyncio.to_thread(python_for, model_dir, self.settings)
        resources = body.get("TransformResources") or {}
        variant = {"ModelName": body["ModelName"], "InstanceType": resources.get("InstanceType"),
                   "InitialInstanceCount": int(resources.get("InstanceCount") or 1)}
        plan = plan_variant(variant, model, model_dir=model_dir, digest=digest, display_name=display,
                            log_file=self.log_file(name), settings=self.settings)
        spec = WorkerSpec(config=plan.config, python=python, run_dir=self.root / name / "run",
                          startup_timeout_s=plan.startup_timeout_s)
        pool = WorkerPool(spec, plan.count, tag=f"transform-{name}", standbys=self.standbys)
        self._log(name, f"starting {plan.count} worker(s) for model {plan.model_name} ({model_dir})")
        await pool.start()
        pool.budget_pixels = plan.memory_budget_pixels
        if plan.default_handler:
            self._default_handler.add(name)
        offered = await self._execution_parameters(pool)
        params = resolve_parameters(body, offered)
        self._log(name, f"execution parameters: {params.to_dict()}"
                  + (f" (container offered {offered})" if offered else ""))
        return pool, params

    async def _execution_parameters(self, pool: WorkerPool) -> dict[str, Any] | None:
        """The container's ``GET /execution-parameters`` answer (None when it does not answer one)."""
        worker = pool.workers[0]
        try:
            async with httpx.AsyncClient(timeout=10.0) as client:
                reply = await client.get(f"{worker.url}/execution-parameters", headers=auth_header(worker.secret))
            data = reply.json() if reply.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    async def _run_files(self, name: str, body: dict[str, Any], pool: WorkerPool,
                         params: ExecutionParameters) -> None:
        concurrency = max(1, min(params.max_concurrent * len(pool.workers), pool.capacity))
        slots = asyncio.Semaphore(concurrency)
        files_at_once = asyncio.Semaphore(_FILES_AT_ONCE)
        pending = [f for f in self.db.files(name) if f.status is FileStatus.PENDING]

        async def one(f: FileRecord) -> None:
            async with files_at_once:
                await self._run_file(name, body, pool, params, f, slots)

        await asyncio.gather(*(one(f) for f in pending))

    async def _run_file(self, name: str, body: dict[str, Any], pool: WorkerPool, params: ExecutionParameters,
                        f: FileRecord, slots: asyncio.Semaphore) -> None:
        tin, tout = body["TransformInput"], body["TransformOutput"]
        spool = self.root / name / "spool" / str(f.idx)
        try:
            data = await asyncio.to_thread(self._read_input, f.key, str(tin.get("CompressionType") or "None"))
            units = split_units(data, str(tin.get("SplitType") or "None"), params.batch_strategy,
                                params.max_payload_mb * 1024 * 1024)
        except RecordFailed as exc:
            self._fail_file(name, f, str(exc))
            return
        except SdmakerError as exc:
            self._fail_file(name, f, exc.message)
            return
        self.db.set_file(name, f.idx, units=len(units))
        done = self.db.done_units(name, f.idx)
        todo = [i for i in range(len(units)) if i not in done or not (spool / f"{i}.out").is_file()]
        if done:
            self._log(name, f"{f.key}: {len(units) - len(todo)} of {len(units)} unit(s) already done")
        headers = {k: v for k, v in (("Content-Type", tin.get("ContentType")), ("Accept", tout.get("Accept"))) if v}
        client_config = body.get("ModelClientConfig") or {}
        timeout_s = float(client_config.get("InvocationsTimeoutInSeconds") or DEFAULT_INVOCATION_TIMEOUT_S)
        retries = client_config.get("InvocationsMaxRetries")
        retries = DEFAULT_MAX_RETRIES if retries is None else int(retries)
        failure: list[str] = []
        fetcher = ImageFetcher(self.settings, self._s3) if name in self._default_handler else None

        async def run_unit(i: int) -> None:
            payload, first, count = units[i]
            async with slots:
                if failure:  # the file failed already: its other records are not worth computing
                    return
                try:
                    if fetcher is not None:  # image references: fetched here, the worker gets base64
                        payload = await asyncio.to_thread(self._fetch_images, payload, headers.get("Content-Type"),
                                                          fetcher)
                    out = await self._invoke(pool, payload, headers, timeout_s, retries)
                except RecordFailed as exc:
                    what = f"record {first + 1}" if count == 1 else f"records {first + 1}-{first + count}"
                    failure.append(f"{what}: {exc}")
                    return
            await asyncio.to_thread(atomic_write_bytes, spool / f"{i}.out", out)
            await asyncio.to_thread(self.db.unit_done, name, f.idx, i, count)

        await asyncio.gather(*(run_unit(i) for i in todo))
        if failure:
            self._fail_file(name, f, failure[0])
            return
        assemble = str(tout.get("AssembleWith") or "None")
        await asyncio.to_thread(self._write_output, f, spool, len(units), assemble)
        self.db.set_file(name, f.idx, status=FileStatus.DONE)
        self._log(name, f"{f.key}: {len(units)} unit(s) done, wrote {f.out_key}")
        with contextlib.suppress(OSError):
            shutil.rmtree(spool)

    def _fail_file(self, name: str, f: FileRecord, error: str) -> None:
        self.db.set_file(name, f.idx, status=FileStatus.FAILED, error=error[:1024])
        self._log(name, f"{f.key} failed: {error}")
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root / name / "spool" / str(f.idx))

    @staticmethod
    def _fetch_images(payload: bytes, content_type: str | None, fetcher: ImageFetcher) -> bytes:
        """The unit with its image references fetched; a reference that cannot be fetched fails the record."""
        try:
            return resolve_record(payload, content_type, fetcher)
        except SdmakerError as exc:
            raise RecordFailed(exc.message) from None

    def _read_input(self, uri: str, compression: str) -> bytes:
        from sdmaker.errors import S3Error
        from sdmaker.store import parse_s3_uri, s3

        bucket, key = parse_s3_uri(uri)
        with s3._mapped("read input", bucket, key):
            raw = self._s3().get_object(Bucket=bucket, Key=key)["Body"].read()
        if compression != "Gzip":
            return bytes(raw)
        try:
            out = gzip.GzipFile(fileobj=io.BytesIO(raw)).read(_MAX_INPUT_BYTES + 1)
        except (OSError, EOFError, zlib.error) as exc:
            raise S3Error(f"CompressionType is Gzip but the file is not valid gzip: {exc}", uri=uri) from None
        if len(out) > _MAX_INPUT_BYTES:
            raise S3Error(f"decompressed input is larger than {_MAX_INPUT_BYTES} bytes", uri=uri)
        return out

    async def _invoke(self, pool: WorkerPool, payload: bytes, headers: dict[str, str], timeout_s: float,
                      retries: int) -> bytes:
        """One unit on the job's workers; server-side failures are retried ``retries`` times, a 4xx is not."""
        last = ""
        for _attempt in range(retries + 1):
            try:
                reply = await pool.invoke(payload, headers, timeout_s=timeout_s)
            except (InvocationTimeoutError, InvocationFailedError) as exc:
                last = exc.message
                continue
            if reply.status < 300:
                return reply.body
            last = _error_text(reply.body, reply.status)
            if reply.status < 500:
                break
        raise RecordFailed(last or "failed")

    def _write_output(self, f: FileRecord, spool: Path, units: int, assemble: str) -> None:
        """Join the spooled outputs in input order and upload them as one object (complete or absent)."""
        from sdmaker.store import parse_s3_uri, s3

        bucket, key = parse_s3_uri(f.out_key)
        tmp = spool / "assembled.tmp"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as out:
            for i in range(units):
                part = (spool / f"{i}.out").read_bytes()
                out.write(part)
                if assemble == "Line" and not part.endswith(b"\n"):
                    out.write(b"\n")
        with s3._mapped("write output", bucket, key), open(tmp, "rb") as fh:
            self._s3().upload_fileobj(fh, bucket, key)
        tmp.unlink(missing_ok=True)


def describe_times(job: Any) -> dict[str, float]:
    """The timestamps DescribeTransformJob shows for ``job`` (a :class:`~._transform_state.JobRecord`)."""
    out = {"CreationTime": job.created, "LastModifiedTime": job.modified}
    if job.started is not None:
        out["TransformStartTime"] = job.started
    if job.ended is not None:
        out["TransformEndTime"] = job.ended
    return out
