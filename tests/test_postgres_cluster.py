"""The throwaway PostgreSQL cluster fixture works: version, a usable empty database, auth."""

from __future__ import annotations

import optuna
import pytest
import sqlalchemy

from .postgres import Cluster


def test_connects_with_psycopg_and_is_postgres_15(postgres: Cluster) -> None:
    engine = sqlalchemy.create_engine(postgres.url("postgres"))
    try:
        with engine.connect() as conn:
            version = conn.execute(sqlalchemy.text("SELECT version()")).scalar_one()
            user = conn.execute(sqlalchemy.text("SELECT current_user")).scalar_one()
        assert engine.dialect.driver == "psycopg"
    finally:
        engine.dispose()
    assert version.startswith("PostgreSQL 15"), version
    assert user == "slimtune"


def test_created_database_is_empty_and_holds_an_optuna_study(postgres: Cluster) -> None:
    url = postgres.create_database("cluster_smoke")
    engine = sqlalchemy.create_engine(url)
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    storage = optuna.storages.RDBStorage(url)
    try:
        study = optuna.create_study(study_name="smoke", storage=storage, directions=["maximize", "minimize"])
        trial = study.ask()
        trial.set_user_attr("plan", {"fc1": {"prune_ratio": 0.5, "weight_bits": 4}})
        study.tell(trial, [0.9, 1234.0])
        loaded = optuna.load_study(study_name="smoke", storage=optuna.storages.RDBStorage(url))
        [stored] = loaded.get_trials()
        assert stored.state == optuna.trial.TrialState.COMPLETE
        assert stored.values == [0.9, 1234.0]
        assert stored.user_attrs["plan"]["fc1"]["weight_bits"] == 4
    finally:
        storage.engine.dispose()


def test_wrong_password_is_refused(postgres: Cluster) -> None:
    engine = sqlalchemy.create_engine(postgres.bad_password_url("postgres"))
    try:
        with pytest.raises(sqlalchemy.exc.OperationalError, match="password authentication failed"):
            with engine.connect():
                pass
    finally:
        engine.dispose()
