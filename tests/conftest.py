from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

from atlasd.db.migrate import init_sdk_schema, migrate  # noqa: E402
from atlasd.logging import configure_logging  # noqa: E402
from atlasd.testing import pg  # noqa: E402
from tests.slurm_cluster import SlurmCluster, start_cluster, unavailable as slurm_unavailable  # noqa: E402


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A template database with the SDK stand-in schema and all atlasd migrations."""
    name = pg.create_database("atlasd_tmpl")
    url = pg.url_for(name)
    init_sdk_schema(url)
    migrate(url)
    yield name
    pg.drop_database(name)


@pytest.fixture()
def db_url(pg_template: str) -> Iterator[str]:
    """A fresh, migrated database for one test (a copy of the template)."""
    name = pg.create_database(template=pg_template)
    yield pg.url_for(name)
    pg.drop_database(name)


@pytest.fixture()
def bare_db_url() -> Iterator[str]:
    """An empty database: no SDK tables, no atlasd schema."""
    name = pg.create_database("atlasd_bare")
    yield pg.url_for(name)
    pg.drop_database(name)


@pytest.fixture()
def log_to_stdout() -> None:
    """atlasd's logging on this test's stdout (not a stream an earlier test, or CLI test, closed)."""
    configure_logging("json", "info", stream=sys.stdout)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(teacher, student) folders: tiny offline Qwen2 models sharing one tokenizer (trainers/tiny.py)."""
    from trainers.tiny import build_tiny_pair

    teacher, student = build_tiny_pair(tmp_path_factory.mktemp("tiny_models"))
    return str(teacher), str(student)


@pytest.fixture()
def tiny_frozen(tiny_models: tuple[str, str]):
    """The tiny models loaded for evaluation on CPU, fp32 and frozen, with 2 threads:
    (tokenizer, student, teacher, device)."""
    import torch

    from trainers.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(2)
    teacher_path, student_path = tiny_models
    device = torch.device("cpu")
    return (load_tokenizer(student_path), load_causal_lm(student_path, device, torch.float32, trainable=False),
            load_causal_lm(teacher_path, device, torch.float32, trainable=False), device)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A real single-node Slurm for the session (tests/slurm_cluster.py); its client configuration
    is ``cluster.conf`` (``SLURM_CONF``). Skips naming what is missing (binaries, root)."""
    why = slurm_unavailable()
    if why is not None:
        pytest.skip(why)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm-cluster"))
    yield cluster
    cluster.stop()
