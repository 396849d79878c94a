"""The test run's own fallback: where no PostgreSQL server answers, a
throwaway one is started (so a fresh machine passes too)."""

from __future__ import annotations

import os

import psycopg2
import pytest

from ._postgres import ENV_SKIP_LOCAL, ENV_URL, find_or_start_postgres


def test_a_throwaway_server_starts_listens_and_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_URL, raising=False)
    monkeypatch.setenv(ENV_SKIP_LOCAL, "1")
    url, cleanup, summary = find_or_start_postgres()
    try:
        assert ":5432/" not in url, f"expected a throwaway server, got {url}"
        conn = psycopg2.connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            (version,) = cur.fetchone()
            cur.execute("LISTEN t")
            cur.execute("NOTIFY t, 'hello'")
        # What the test run prints at its start when it uses such a server.
        port = url.split(":")[-1].split("/")[0]
        assert summary.startswith("127.0.0.1:5432 skipped"), summary
        assert f"; started a throwaway PostgreSQL {version} at 127.0.0.1:{port} " in summary
        conn.poll()
        assert [n.payload for n in conn.notifies] == ["hello"]
        conn.close()
    finally:
        cleanup()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(url, connect_timeout=3).close()


def test_a_url_that_does_not_answer_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """DBNOTIFY_TEST_POSTGRES_URL is used as given, never silently replaced."""
    monkeypatch.setenv(ENV_URL, "postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(RuntimeError, match="does not answer"):
        find_or_start_postgres()
    assert os.environ[ENV_URL].endswith(":1/none")
