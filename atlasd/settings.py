"""Daemon settings: environment variables prefixed ``ATLASD_``, an optional env file and an
optional TOML file (``ATLASD_CONFIG``), in that order of precedence (env wins).

Secrets: ``db_url`` may carry a password. Use :func:`redact_url` whenever a URL is shown;
``Settings.__repr__`` never shows it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# the password runs to the LAST '@' before the host (an unencoded '@' in a password included)
_URL_PASSWORD = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^\s/]*)(?P<at>@)")
_KV_PASSWORD = re.compile(r"(?P<pre>\bpassword\s*=\s*)(?P<pw>'[^']*'|\S+)", re.IGNORECASE)


def redact_url(text: str | None) -> str:
    """Hide passwords in URLs (``scheme://user:pw@host``) and libpq key=value strings."""
    if not text:
        return ""
    text = _URL_PASSWORD.sub(lambda m: f"{m['pre']}***{m['at']}", text)
    return _KV_PASSWORD.sub(lambda m: f"{m['pre']}***", text)


# Environment variables that carry credentials. A child gets only those it needs (child_env).
SECRET_ENV = ("ATLASD_DB_URL", "ATLASD_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
              "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PGPASSWORD")


def child_env(**extra: str) -> dict[str, str]:
    """The daemon's environment without any of ``SECRET_ENV``, plus ``extra`` (what this child needs)."""
    return {**{k: v for k, v in os.environ.items() if k not in SECRET_ENV}, **extra}


def without_password(url: str) -> str:
    """``scheme://user:pw@host/...`` -> ``scheme://user@host/...``: what may be stored (run specs);
    the password stays in the environment (``MLFLOW_TRACKING_URI``, PGPASSWORD, .pgpass)."""
    match = _URL_PASSWORD.match(url)
    return url if match is None else f"{match['pre'][:-1]}@{url[match.end():]}"


def split_host_port(addr: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` / ``"[::1]:9464"`` -> (host, port); ValueError naming the problem."""
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:9464 or [::1]:9464), got {addr!r}")
    return host, int(port)


def _default_state_dir() -> Path:
    if os.environ.get("STATE_DIRECTORY"):  # systemd StateDirectory=
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    return Path.home() / ".local" / "state" / "atlasd"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ATLASD_",
        env_file=os.environ.get("ATLASD_ENV_FILE"),
        extra="ignore",
    )

    db_url: SecretStr = Field(
        default=SecretStr("postgresql://postgres@127.0.0.1:5432/atlas"),
        description="libpq URL of the Atlas database (the SDK's tables and atlasd's schema).",
    )
    policies_dir: Path = Field(default=Path("policies"), description="Folder of policy YAML files.")
    state_dir: Path = Field(default_factory=_default_state_dir, description="Runs, checkpoints, MLflow sqlite.")
    mlflow_tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI; default sqlite:///<state_dir>/mlflow.db."
    )
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "info"

    # intake
    poll_interval_s: float = Field(default=30.0, gt=0, description="Slow reconcile poll, whatever NOTIFY says.")
    notify_timeout_s: float = Field(default=5.0, gt=0, description="Listener wait per notifies() call.")
    reconnect_max_backoff_s: float = Field(default=30.0, gt=0)
    intake_batch_size: int = Field(default=5000, gt=0, description="Sessions copied per reconcile transaction.")
    lock_wait: bool = Field(default=False, description="Wait for the per-database lock instead of exiting.")

    # cadence
    catchup_window_s: float = Field(
        default=86400.0, ge=0, description="A cron tick missed while down runs once at start if this recent (s)."
    )

    # runner
    cuda_visible_devices: str | None = Field(
        default=None, description="Exported to the training child as CUDA_VISIBLE_DEVICES (which GPU it uses)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Training device of the child.")
    runner_poll_s: float = Field(default=2.0, gt=0, description="How often the runner looks for a queued run.")
    child_stop_timeout_s: float = Field(
        default=600.0, gt=0, description="On stop/cancel, how long the child may take to save its checkpoint."
    )
    stale_heartbeat_s: float = Field(
        default=120.0, gt=0, description="A running child silent this long is stopped and its run marked failed."
    )
    stale_progress_s: float = Field(
        default=1800.0, gt=0,
        description="A running child with no progress this long (no step, phase or eval batch; heartbeats alone do "
        "not count: a hung main thread) is stopped and its run marked failed.",
    )

    # executor: where the trainer runs (README "Cluster (Slurm)")
    executor: Literal["local", "slurm"] = Field(
        default="local", description="local: a child process on this machine; slurm: a Slurm batch job (sbatch)."
    )
    slurm_partition: str | None = Field(default=None, description="sbatch --partition of the training job.")
    slurm_account: str | None = Field(default=None, description="sbatch --account of the training job.")
    slurm_gpus: str | None = Field(default=None, description='sbatch --gpus (e.g. "1" or "a100:1").')
    slurm_time: str | None = Field(
        default=None, description='sbatch --time (e.g. "4:00:00"); at the limit the trainer gets SIGTERM 120 s early.'
    )
    slurm_extra_args: list[str] = Field(
        default_factory=list,
        description='More sbatch arguments, a JSON list (e.g. ["--qos=high", "--container-mounts=/shared:/shared"]).',
    )
    slurm_shared_dir: Path | None = Field(
        default=None,
        description="The shared filesystem the compute nodes see; the run folders (STATE_DIR/runs) must be inside it "
        "(default: STATE_DIR itself must be shared).",
    )
    slurm_container_image: str | None = Field(
        default=None, description="Pyxis container image of the job (sbatch --container-image)."
    )
    slurm_python: str | None = Field(
        default=None,
        description="The Python that runs `-m trainers` on the compute node (default: the daemon's own interpreter; "
        "`python` with a container image).",
    )
    slurm_poll_s: float = Field(default=5.0, gt=0, description="How often squeue is asked whether the job still runs.")

    # registry child (python -m registry) and promotion hooks
    registry_source: Literal["artifacts", "path"] = Field(
        default="artifacts",
        description="Register a checkpoint as MLflow run artifacts (a copy) or by its local path (no copy; keep the run folder).",
    )
    promotion_notify: bool = Field(default=True, description="NOTIFY atlasd_promotions {model, version, policy} when the champion moves.")
    promotion_hook: list[str] | None = Field(
        default=None,
        description='Command run without a shell when the champion moves, a JSON list (e.g. ["/usr/local/bin/reload-model"]); '
        "it gets ATLASD_PROMOTION_{MODEL,VERSION,POLICY,ACTION} in its environment.",
    )

    # operations
    metrics_addr: str = Field(
        default="127.0.0.1:9464",
        description="HOST:PORT of the Prometheus endpoint (/metrics); empty disables it; port 0 picks a free one.",
    )
    keep_versions: int = Field(
        default=5, ge=0, le=10_000,
        description="Retention: run folders of each policy's last N model versions are kept (besides the champion "
                    "and the previous champion).")
    keep_days: float = Field(default=14.0, ge=0, le=36_500,
                             description="Retention: run folders of runs finished less than this many days ago are kept.")
    gc_interval_s: float = Field(default=3600.0, ge=0,
                                 description="How often the daemon applies the retention policy (0: only `atlasd gc`).")
    metrics_refresh_s: float = Field(
        default=10.0, gt=0, le=3600,
        description="How often the metrics cache is refreshed (one database connection); scrapes read the cache.",
    )

    @field_validator("metrics_addr")
    @classmethod
    def _check_metrics_addr(cls, value: str) -> str:
        value = value.strip()
        if value:
            split_host_port(value)
        return value

    @field_validator("db_url")
    @classmethod
    def _check_db_url(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if not raw.startswith(("postgresql://", "postgres://")) and "=" not in raw:
            raise ValueError(f"ATLASD_DB_URL must be a postgresql:// URL or a libpq conninfo, got {redact_url(raw)!r}")
        return value

    @property
    def dsn(self) -> str:
        """The real connection string (with password): pass it to libpq, never log it."""
        return self.db_url.get_secret_value()

    @property
    def dsn_redacted(self) -> str:
        return redact_url(self.dsn)

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.state_dir.resolve() / 'mlflow.db'}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        toml_path = os.environ.get("ATLASD_CONFIG")
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)

    def public_dict(self) -> dict[str, Any]:
        """Settings as shown to operators and logs: no secrets."""
        data = self.model_dump(mode="json")
        data["db_url"] = self.dsn_redacted
        if data.get("mlflow_tracking_uri"):
            data["mlflow_tracking_uri"] = redact_url(data["mlflow_tracking_uri"])
        return data


class SettingsError(ValueError):
    """Invalid settings; the message names each field and never echoes a secret."""


def load_settings(**overrides: Any) -> Settings:
    """Load settings; a validation error names the field (and never echoes a password)."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_input=False, include_url=False):
            field = "ATLASD_" + "_".join(str(p) for p in err["loc"]).upper()
            lines.append(f"{field}: {redact_url(err['msg'])}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
