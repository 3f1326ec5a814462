"""Settings, read from the environment in this one module.

No other sdmaker module reads ``os.environ``: entry points (the CLI callback, the server's
``create_app``, worker processes) call :func:`load_settings` once and pass the frozen result down.
That keeps tests hermetic (they build a ``Settings`` by hand) and makes every knob discoverable here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from sdmaker.errors import ConfigError

__all__ = ["ENGINES", "S3_PATH_PREFIX", "Settings", "OPENMP_SPIN_COUNT", "check_engine", "export_engine", "allow_mlflow_file_store", "load_settings", "machine_is_busy", "openmp_spin_default", "openmp_spin_for", "quiet_third_party_logs",
           "replace_environment", "with_local_key"]

_TRUE = {"1", "true", "yes", "on"}
#: The built-in S3 lives on the daemon's port under this path (botocore keeps an endpoint URL's path).
S3_PATH_PREFIX = "/s3"


#: ``SDMAKER_ENGINE`` values: the backend of compiled UNet passes (:func:`sdmaker.engine.engine_decision`).
ENGINES = ("auto", "torch", "openvino")


def check_engine(engine: str, *, field: str = "SDMAKER_ENGINE") -> str:
    """``engine`` if it is one of :data:`ENGINES`, else a :class:`ConfigError` naming ``field``."""
    if engine not in ENGINES:
        raise ConfigError(f"{field} must be one of {', '.join(ENGINES)}", field=field, value=engine)
    return engine


def export_engine(engine: str, *, field: str = "engine") -> None:
    """Set ``SDMAKER_ENGINE`` for this process and its children (``sdmaker serve --engine``: the worker reads it
    from its environment, in this process or in the model's own env after an exec)."""
    os.environ["SDMAKER_ENGINE"] = check_engine(engine, field=field)


@dataclass(frozen=True)
class Settings:
    """Resolved configuration.

    Attributes:
        home: root of all sdmaker state (store, endpoints DB, logs); ``SDMAKER_HOME``, default ``~/.sdmaker``.
        offline: never touch the network for models (``SDMAKER_OFFLINE`` or ``HF_HUB_OFFLINE``).
        debug: show tracebacks in the CLI (``SDMAKER_DEBUG``).
        device: ``auto`` | ``cpu`` | ``cuda`` (``SDMAKER_DEVICE``).
        dtype: ``auto`` | ``fp32`` | ``bf16`` | ``fp16`` (``SDMAKER_DTYPE``).
        aws_endpoint_url_s3: S3-compatible endpoint (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``).
        aws_config_s3_endpoint: the AWS config file (``AWS_CONFIG_FILE``, default ``~/.aws/config``) names an
            S3 endpoint (``endpoint_url`` in the profile or its ``services`` section) that botocore will use.
        s3_builtin: ``sdmaker up`` serves its own S3 at ``<daemon>/s3`` (``SDMAKER_S3``: ``auto``, the default,
            or ``off``), data under ``$SDMAKER_HOME/s3``. sdmaker (and ``sdmaker env``) point S3 clients at it
            unless the user configured an S3 endpoint of their own (:attr:`s3_endpoint_url`).
        env: the raw environment snapshot, for the few places (subprocess spawning) that must pass it on.
        daemon_host / daemon_port: where ``sdmaker up`` listens (``SDMAKER_HOST``, default 127.0.0.1;
            ``SDMAKER_PORT``, default 8765); clients use ``SDMAKER_URL`` (default from these two).
        auth_access_key_id / auth_secret_access_key: the SigV4 credentials the daemon accepts
            (``SDMAKER_ACCESS_KEY_ID`` / ``SDMAKER_SECRET_ACCESS_KEY``); ``auth_token``: a bearer token
            (``SDMAKER_API_TOKEN``). ``require_auth`` (``SDMAKER_REQUIRE_AUTH``) forces authentication even
            on loopback; any other bind address always requires it.
        invocation_timeout_s: default per-endpoint invocation budget (``SDMAKER_INVOCATION_TIMEOUT``, 60 s
            like SageMaker real-time; CPU generation may need more: it is also settable per endpoint).
        max_body_bytes: request body cap (``SDMAKER_MAX_BODY_BYTES``, SageMaker's 6 MiB).
        max_queue: waiting requests per endpoint before 503 (``SDMAKER_MAX_QUEUE``, 100 like MMS).
        startup_timeout_s: how long a worker may take to pass ``/ping`` (``SDMAKER_STARTUP_TIMEOUT``).
        region / account_id: what ARNs and error texts say (``AWS_REGION``/``AWS_DEFAULT_REGION``,
            ``SDMAKER_ACCOUNT_ID``).
        sagemaker_program: the handler module in ``<model>/code`` (``SAGEMAKER_PROGRAM``; unset or empty
            means ``inference.py``, contract 1.7).
        bind_port: the model server's port (``SAGEMAKER_BIND_TO_PORT``, default 8080, contract 1.2).
        standby_workers: warm standby worker processes the daemon keeps (``SDMAKER_STANDBY_WORKERS``,
            default 1; 0 turns them off): each has torch/diffusers imported already, so a new endpoint's
            worker only loads its model (cold start about 1 s instead of 5-10 s of imports).
        compile: compiled UNet steps in serving workers (``SDMAKER_COMPILE``: ``auto``, the default, compiles
            SD-class UNets in bf16 on the CPU in a background child process and switches each image size to its
            compiled step once built, :mod:`sdmaker.engine._compiled`; ``on`` any model on the CPU; ``off``).
            One-shot CLI runs never build (they would not earn the minutes back); ``sdmaker generate`` loads
            the passes a serving worker built for that model and size on this machine.
        engine: which backend builds those compiled passes (``SDMAKER_ENGINE``: ``auto``, the default, is
            OpenVINO on AVX512-BF16 CPUs (AMX or not), where it was measured to win end to end and covers
            DeepCache's passes too, and torch's AOTInductor elsewhere; ``torch``; ``openvino``, which also
            builds for models ``auto`` would leave eager). See :func:`sdmaker.engine.engine_decision`.
        openvino_static: how many batch sizes per pass the OpenVINO engine gives a static-shape copy once they
            recur (``SDMAKER_OPENVINO_STATIC``, default 1; 0 = none): faster per step than the shared
            dynamic compile, at one more copy of the weights each (:class:`sdmaker.engine._openvino.OpenVinoRunner`).
        compile_cache_bytes: the bound on ``$SDMAKER_HOME/cache/compiled`` (``SDMAKER_COMPILE_CACHE_GB``,
            default 10; 0 = unbounded): least recently used packages are removed after each build.
        log_max_bytes: size at which an endpoint log is rotated to ``.1`` (two copies kept;
            ``SDMAKER_LOG_MAX_BYTES``, default 32 MiB; 0 = never rotate).
        allowed_hosts: extra ``Host`` names the daemon and workers answer besides their bind address and,
            on loopback, ``localhost``/``127.0.0.1``/``[::1]`` (``SDMAKER_ALLOWED_HOSTS``, comma separated;
            ``*`` = any). Stops DNS-rebinding web pages: see :mod:`sdmaker.serving._hosts`.
        local_key: require the local key (``$SDMAKER_HOME/local-key.json``, created 0600 by ``sdmaker up``)
            for control-plane calls on loopback too (``SDMAKER_LOCAL_KEY``). Stops other users of this
            machine. When the file exists it also fills in ``auth_*`` unless those are set explicitly,
            which is how the CLI, :class:`sdmaker.client.Client` and ``sdmaker env`` pick it up;
            ``local_token`` is then the key's secret (the client's bearer token).
        worker_token: the per-worker secret a daemon-spawned worker requires on ``/invocations``
            (``SDMAKER_WORKER_TOKEN``, set by the daemon; never set it by hand).
        max_instances: the most worker processes one endpoint variant may ask for
            (``InitialInstanceCount`` x ``SAGEMAKER_MODEL_SERVER_WORKERS``; ``SDMAKER_MAX_INSTANCES``,
            default: 4 per CPU core, at least 8).
        memory_bytes: the memory the workers of one endpoint share (``SDMAKER_MEMORY_MB``; default the
            machine's ``MemTotal`` from ``/proc/meminfo``, 8 GiB where there is none). Each endpoint derives
            its per-worker memory budget in pixels from it and the model (issue 11: one 1536x1536 x 32 images
            request grew a worker past 8 GiB).
        mme_memory_bytes: the memory the target models a multi-model endpoint keeps loaded share
            (``SDMAKER_MME_MEMORY_MB``, also settable in the model's Environment; default ``memory_bytes``).
            Each loaded model costs what one of its workers needs at least (runtime + weights); a new one
            evicts the least recently used until it fits.
        mme_load_wait_s: how long an invocation waits for its target model to load before it gets
            ``ModelNotReadyException`` (429) while the load goes on (``SDMAKER_MME_LOAD_WAIT``, default 30 s:
            a cold answer, load included, then still fits botocore's 60 s read timeout).
        async_max_queue: asynchronous inference jobs one endpoint may hold queued before a submit gets 503 with
            ``Retry-After`` (``SDMAKER_ASYNC_MAX_QUEUE``, default 1000).
        lora_cache_bytes: memory each worker may keep loaded LoRA adapters in (least recently used dropped first;
            ``SDMAKER_LORA_CACHE_MB``, default 256).
        memory_budget_pixels: set the per-worker budget directly, in pixels (height x width x images held at
            once; ``SDMAKER_MEMORY_BUDGET_PIXELS``; unset or 0: derived from ``memory_bytes``).
        openai_model: what the OpenAI Images API runs for a request without ``model`` or with a model name
            clients hard-code (``dall-e-2``, ``dall-e-3``, ``gpt-image-*``): an endpoint name or a store model
            name (``SDMAKER_OPENAI_MODEL``, default ``mini``, the built-in model).
        ray_address: run endpoint replicas on this Ray cluster instead of local processes (``SDMAKER_RAY_ADDRESS``
            or ``sdmaker up --ray``: ``host:port`` of its GCS, or ``auto``); unset: the local backend.
        ray_instance_types: overrides of the instance type -> Ray resources table (``SDMAKER_RAY_INSTANCE_TYPES``:
            a JSON object, inline or a file path; see :mod:`sdmaker.serving.daemon.ray._resources`).
        ray_head_url: the daemon URL replicas on other nodes fetch models from (``SDMAKER_RAY_HEAD_URL``; default
            the bind address, or this node's Ray IP when bound to 0.0.0.0).
        autoscaling_window_s: the period over which the local autoscaler averages its metrics
            (``SDMAKER_AUTOSCALING_WINDOW``, default 60 s like CloudWatch's 1-minute period):
            invocations per instance are counted over it, concurrent requests (a high-resolution metric)
            over a sixth of it. Tests shorten it.
        image_url_hosts: hosts whose ``http(s)://`` URLs asynchronous and batch transform requests may name as
            their ``image``/``mask_image`` (``SDMAKER_IMAGE_URL_HOSTS``, comma separated, ``host`` or
            ``host:port``; default none: URLs are refused, as the daemon fetching any URL a caller names would let
            callers reach whatever the daemon can, SSRF). ``s3://`` references need no setting.
        image_url_timeout_s: the most one image URL's download may take, redirects included
            (``SDMAKER_IMAGE_URL_TIMEOUT``, default 30 s).
    """

    home: Path
    offline: bool = False
    debug: bool = False
    device: str = "auto"
    dtype: str = "auto"
    aws_endpoint_url_s3: str | None = None
    aws_config_s3_endpoint: bool = False
    s3_builtin: bool = True
    env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    daemon_host: str = "127.0.0.1"
    daemon_port: int = 8765
    daemon_url: str | None = None
    auth_access_key_id: str | None = None
    auth_secret_access_key: str | None = field(default=None, repr=False)
    auth_token: str | None = field(default=None, repr=False)
    require_auth: bool = False
    invocation_timeout_s: float = 60.0
    max_body_bytes: int = 6 * 1024 * 1024
    max_queue: int = 100
    startup_timeout_s: float = 600.0
    region: str = "us-east-1"
    account_id: str = "000000000000"
    sagemaker_program: str = "inference.py"
    bind_port: int = 8080
    standby_workers: int = 1
    compile: str = "auto"
    engine: str = "auto"
    openvino_static: int = 1
    compile_cache_bytes: int = 10 * 1000**3
    log_max_bytes: int = 32 * 1024 * 1024
    allowed_hosts: tuple[str, ...] = ()
    local_key: bool = False
    worker_token: str | None = field(default=None, repr=False)
    local_token: str | None = field(default=None, repr=False)
    max_instances: int = field(default_factory=lambda: max(8, 4 * (os.cpu_count() or 1)))
    memory_bytes: int = field(default_factory=lambda: _machine_memory_bytes())
    memory_budget_pixels: int | None = None
    openai_model: str = "mini"
    ray_address: str | None = None
    ray_instance_types: str | None = None
    ray_head_url: str | None = None
    autoscaling_window_s: float = 60.0
    async_max_queue: int = 1000
    mme_memory_bytes: int | None = None
    mme_load_wait_s: float = 30.0
    lora_cache_bytes: int = 256 * 1024**2
    image_url_hosts: tuple[str, ...] = ()
    image_url_timeout_s: float = 30.0

    @property
    def store_dir(self) -> Path:
        return self.home / "store"

    @property
    def endpoints_dir(self) -> Path:
        return self.home / "endpoints"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlruns"

    @property
    def gallery_dir(self) -> Path:
        """Images generated from the web UI, each a PNG with its recipe (the UI's Gallery page)."""
        return self.home / "gallery"

    @property
    def image_urls_dir(self) -> Path:
        """Images of OpenAI API answers with ``response_format=url``, served for an hour."""
        return self.home / "image-urls"

    @property
    def s3_dir(self) -> Path:
        """The built-in S3's data: ``index.sqlite3`` and content-addressed ``blobs/``."""
        return self.home / "s3"

    @property
    def builtin_s3_url(self) -> str:
        """Where clients reach the built-in S3: the daemon's own port, under :data:`S3_PATH_PREFIX`."""
        return self.client_url + S3_PATH_PREFIX

    @property
    def uses_builtin_s3(self) -> bool:
        """Whether S3 calls go to the built-in S3: it is on and no endpoint of the user's own is configured."""
        return self.s3_builtin and not (self.aws_endpoint_url_s3 or self.aws_config_s3_endpoint)

    @property
    def s3_endpoint_url(self) -> str | None:
        """The endpoint sdmaker's S3 clients use: the user's (env), the built-in S3's, or None (botocore's own
        resolution: an endpoint in the AWS config file, else AWS itself)."""
        if self.aws_endpoint_url_s3:
            return self.aws_endpoint_url_s3
        return self.builtin_s3_url if self.uses_builtin_s3 else None

    @property
    def client_url(self) -> str:
        """Base URL clients use to reach the daemon (``SDMAKER_URL`` or host/port)."""
        if self.daemon_url:
            return self.daemon_url.rstrip("/")
        host = "127.0.0.1" if self.daemon_host in ("0.0.0.0", "::", "") else self.daemon_host
        return f"http://{host}:{self.daemon_port}"

    def with_home(self, home: Path) -> Settings:
        return replace(self, home=home)


def _flag(env: Mapping[str, str], *names: str) -> bool:
    return any(env.get(n, "").strip().lower() in _TRUE for n in names)


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = env.get(name, default).strip().lower() or default
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; allowed: {', '.join(allowed)}", field=name, value=value)
    return value


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number", field=name, value=raw) from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be >= {minimum}", field=name, value=raw)
    return value


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    value = _number(env, name, default, minimum=1)
    if value != int(value) or value > 65535:
        raise ConfigError(f"{name}={env.get(name)!r} is not a TCP port (1..65535)", field=name, value=env.get(name))
    return int(value)


def _machine_memory_bytes() -> int:
    """The machine's total memory (``/proc/meminfo``'s ``MemTotal``); 8 GiB when it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 * 1024**3


def _aws_config_has_s3_endpoint(env: Mapping[str, str]) -> bool:
    """Whether the AWS config file gives S3 an endpoint for the active profile (botocore >= 1.31 reads
    ``endpoint_url`` in ``[profile X]`` and in the ``[services Y]`` section the profile names under ``s3``).

    ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`` turns those off in botocore, and so here.
    """
    import configparser

    if _flag(env, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        return False
    path = Path(env.get("AWS_CONFIG_FILE") or Path(env.get("HOME") or Path.home()) / ".aws" / "config").expanduser()
    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (OSError, configparser.Error, UnicodeDecodeError):
        return False
    profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    section = "default" if profile == "default" and parser.has_section("default") else f"profile {profile}"
    if not parser.has_section(section):
        return False
    if parser.get(section, "endpoint_url", fallback="").strip():
        return True
    services = parser.get(section, "services", fallback="").strip()
    if not services or not parser.has_section(f"services {services}"):
        return False
    nested = configparser.RawConfigParser()
    try:  # ``s3 =`` followed by indented ``endpoint_url = ...`` lines: a nested block
        nested.read_string("[s3]\n" + parser.get(f"services {services}", "s3", fallback=""))
    except configparser.Error:
        return False
    return bool(nested.get("s3", "endpoint_url", fallback="").strip())


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``env`` (default: the process environment)."""
    env = dict(os.environ if env is None else env)
    home = Path(env.get("SDMAKER_HOME") or Path.home() / ".sdmaker").expanduser()
    settings = Settings(
        home=home,
        offline=_flag(env, "SDMAKER_OFFLINE", "HF_HUB_OFFLINE"),
        debug=_flag(env, "SDMAKER_DEBUG"),
        device=_choice(env, "SDMAKER_DEVICE", ("auto", "cpu", "cuda"), "auto"),
        dtype=_choice(env, "SDMAKER_DTYPE", ("auto", "fp32", "bf16", "fp16"), "auto"),
        aws_endpoint_url_s3=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
        aws_config_s3_endpoint=_aws_config_has_s3_endpoint(env),
        s3_builtin=_choice(env, "SDMAKER_S3", ("auto", "off"), "auto") != "off",
        env=env,
        daemon_host=env.get("SDMAKER_HOST", "").strip() or "127.0.0.1",
        daemon_port=int(_number(env, "SDMAKER_PORT", 8765, minimum=1)),
        daemon_url=env.get("SDMAKER_URL") or None,
        auth_access_key_id=env.get("SDMAKER_ACCESS_KEY_ID") or None,
        auth_secret_access_key=env.get("SDMAKER_SECRET_ACCESS_KEY") or None,
        auth_token=env.get("SDMAKER_API_TOKEN") or None,
        require_auth=_flag(env, "SDMAKER_REQUIRE_AUTH"),
        invocation_timeout_s=_number(env, "SDMAKER_INVOCATION_TIMEOUT", 60.0, minimum=1),
        max_body_bytes=int(_number(env, "SDMAKER_MAX_BODY_BYTES", 6 * 1024 * 1024, minimum=1)),
        max_queue=int(_number(env, "SDMAKER_MAX_QUEUE", 100, minimum=0)),
        startup_timeout_s=_number(env, "SDMAKER_STARTUP_TIMEOUT", 600.0, minimum=1),
        region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        account_id=env.get("SDMAKER_ACCOUNT_ID") or "000000000000",
        sagemaker_program=env.get("SAGEMAKER_PROGRAM", "").strip() or "inference.py",
        bind_port=_port(env, "SAGEMAKER_BIND_TO_PORT", 8080),
        standby_workers=int(_number(env, "SDMAKER_STANDBY_WORKERS", 1, minimum=0)),
        compile=_choice(env, "SDMAKER_COMPILE", ("auto", "on", "off"), "auto"),
        engine=_choice(env, "SDMAKER_ENGINE", ENGINES, "auto"),
        openvino_static=int(_number(env, "SDMAKER_OPENVINO_STATIC", 1, minimum=0)),
        compile_cache_bytes=int(_number(env, "SDMAKER_COMPILE_CACHE_GB", 10, minimum=0) * 1000**3),
        log_max_bytes=int(_number(env, "SDMAKER_LOG_MAX_BYTES", 32 * 1024 * 1024, minimum=0)),
        allowed_hosts=tuple(h.strip() for h in env.get("SDMAKER_ALLOWED_HOSTS", "").split(",") if h.strip()),
        local_key=_flag(env, "SDMAKER_LOCAL_KEY"),
        worker_token=env.get("SDMAKER_WORKER_TOKEN") or None,
        max_instances=int(_number(env, "SDMAKER_MAX_INSTANCES", max(8, 4 * (os.cpu_count() or 1)), minimum=1)),
        memory_bytes=int(_number(env, "SDMAKER_MEMORY_MB", 0, minimum=0) * 1024**2) or _machine_memory_bytes(),
        memory_budget_pixels=int(_number(env, "SDMAKER_MEMORY_BUDGET_PIXELS", 0, minimum=0)) or None,
        openai_model=env.get("SDMAKER_OPENAI_MODEL", "").strip() or "mini",
        ray_address=env.get("SDMAKER_RAY_ADDRESS", "").strip() or None,
        ray_instance_types=env.get("SDMAKER_RAY_INSTANCE_TYPES", "").strip() or None,
        ray_head_url=env.get("SDMAKER_RAY_HEAD_URL", "").strip() or None,
        autoscaling_window_s=_number(env, "SDMAKER_AUTOSCALING_WINDOW", 60.0, minimum=1),
        async_max_queue=int(_number(env, "SDMAKER_ASYNC_MAX_QUEUE", 1000, minimum=1)),
        mme_memory_bytes=int(_number(env, "SDMAKER_MME_MEMORY_MB", 0, minimum=0) * 1024**2) or None,
        mme_load_wait_s=_number(env, "SDMAKER_MME_LOAD_WAIT", 30.0, minimum=0),
        lora_cache_bytes=int(_number(env, "SDMAKER_LORA_CACHE_MB", 256, minimum=0) * 1024**2),
        image_url_hosts=tuple(h.strip().lower() for h in env.get("SDMAKER_IMAGE_URL_HOSTS", "").split(",")
                              if h.strip()),
        image_url_timeout_s=_number(env, "SDMAKER_IMAGE_URL_TIMEOUT", 30.0, minimum=1),
    )
    return with_local_key(settings) if settings.local_key else settings


def with_local_key(settings: Settings) -> Settings:
    """``settings`` with the local key (if its file exists) as the SigV4 key pair and ``local_token``.

    ``local_token`` (the key's secret) is the bearer token of the Python client and CLI; it is not
    ``auth_token``, which would also lock ``sdmaker serve``'s open loopback ``/invocations``.

    Explicit ``SDMAKER_ACCESS_KEY_ID``/``SDMAKER_SECRET_ACCESS_KEY``/``SDMAKER_API_TOKEN`` win: a user whose
    AWS credentials serve real S3 sets the daemon's SigV4 pair to those and keeps them in the shell.
    """
    from sdmaker.local_key import read_local_key

    key = read_local_key(settings.home)
    if key is None:
        return settings
    if settings.auth_access_key_id and settings.auth_secret_access_key:
        return replace(settings, local_token=key.secret_access_key)
    return replace(settings, auth_access_key_id=key.access_key_id, auth_secret_access_key=key.secret_access_key,
                   local_token=key.secret_access_key)


def quiet_third_party_logs() -> None:
    """Silence transformers/diffusers/hub chatter (import-time warnings, weight-loading progress bars).

    Called by entry points (CLI, server) unless verbose. It must run before those libraries are imported,
    which is why it sets their documented environment switches rather than calling their logging APIs
    (importing diffusers' logging pulls in torch). Values the user set explicitly are kept.
    """
    for key, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                       ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(key, value)


#: libgomp's spin count when it knows it has more threads than CPUs (its "throttled" value, OMP_WAIT_POLICY unset)
OPENMP_SPIN_COUNT = "100"


def machine_is_busy() -> bool:
    """Whether other work fills this machine's cores right now: more runnable processes than cores
    (``/proc/loadavg``'s running count, this one left out).

    The instant count, not the load average: a machine that just finished a job of ours (one process using
    every core) has a load average near the core count for a minute and is not busy.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1
    except (OSError, ValueError, IndexError):
        return False
    return running > cores


def openmp_spin_for(env: Mapping[str, str], busy: bool) -> str | None:
    """The ``GOMP_SPINCOUNT`` to set (None: leave libgomp's default): 100 on a busy machine, unless the user
    chose a spin count or a wait policy."""
    if not busy or "GOMP_SPINCOUNT" in env or "OMP_WAIT_POLICY" in env:
        return None
    return OPENMP_SPIN_COUNT


def openmp_spin_default() -> None:
    """On a busy machine, make torch's OpenMP threads stop spinning almost at once when they wait.

    libgomp (the OpenMP runtime of torch's CPU wheels) lets a waiting thread spin 300,000 times before it sleeps,
    unless it counts more OpenMP threads than CPUs in its own process; it cannot see other processes. On a
    machine busy with other work, the spinning threads then take the cores the working threads need: one
    ``mini`` generation on the thread that loaded the model took 50-80 s at load 14 on 2 cores, against 0.5-0.9 s
    on a second thread (whose extra pool makes libgomp throttle itself to 100 spins). On a quiet machine the long
    spin is the faster one (a ``mini`` generation took 0.22 s against 0.33 s with 100 spins), so the spin count is
    only lowered when the machine is busy when sdmaker is imported (:func:`machine_is_busy`: more runnable
    processes than cores). It must be set
    before torch loads libgomp, so ``import sdmaker`` calls this; a ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``
    the user set is kept, and nothing changes once torch is imported. Measured by ``python -m bench --only openmp``.
    """
    import sys

    if "torch" in sys.modules:
        return
    value = openmp_spin_for(os.environ, machine_is_busy())
    if value is not None:
        os.environ["GOMP_SPINCOUNT"] = value


def allow_mlflow_file_store() -> None:
    """Let MLflow >= 3 use a plain local folder as its tracking store (it refuses one unless opted in).

    Offline, a local folder under ``SDMAKER_HOME`` is exactly what we want; a value the user set is kept.
    """
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def replace_environment(env: Mapping[str, str]) -> None:
    """Make the process environment exactly ``env`` (a warm standby worker becoming an endpoint's worker).

    Keys missing from ``env`` are unset and the rest set, through ``os.environ`` so the C-level
    environment (``getenv`` in native libraries, child processes) changes too; :func:`load_settings`
    called afterwards sees the new values.
    """
    wanted = {str(k): str(v) for k, v in env.items()}
    for key in list(os.environ):
        if key not in wanted:
            del os.environ[key]
    os.environ.update(wanted)
