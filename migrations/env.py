"""Alembic environment.

The URL comes from ``-x url=…`` (tests, one-off runs), else from the config's
``sqlalchemy.url`` when a caller set it programmatically (`service.migrate`), else from the
service settings (``SHARP_DATABASE_URL``), so the migration job in production reads the same
variable as the API. ``render_as_batch`` lets ALTERs work on SQLite (it rebuilds the table);
the engine comes from `service.db.make_engine`, so SQLite gets the same pragmas as at run time.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy.pool import NullPool

from service.db import make_engine
from service.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    x = context.get_x_argument(as_dictionary=True)
    if x.get("url"):
        return x["url"]
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from service.settings import get_settings

    return get_settings().database_url


def _options(url: str) -> dict:
    return {
        "target_metadata": target_metadata,
        "render_as_batch": url.startswith("sqlite"),
        "compare_type": True,
        "compare_server_default": True,
    }


def run_migrations_offline() -> None:
    url = _url()
    context.configure(
        url=url, literal_binds=True, dialect_opts={"paramstyle": "named"}, **_options(url)
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = _url()
    connectable = config.attributes.get("connection")
    if connectable is not None:
        context.configure(connection=connectable, **_options(url))
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, **_options(url))
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
