"""What one PostgreSQL commit costs on this machine: a durable commit (the WAL flushed to disk before it returns)
against one with ``synchronous_commit = off``, alternating, on a one-row table in the bench database.

Why: every job the service runs is a few small transactions (claim, record, advance); this prints how much of
``bench/service.py``'s per-job figures those commits can account for on the machine it runs on.

    python -m bench.pg_commit [--commits N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import psycopg
from sqlalchemy.engine import make_url

from bench.common import loadavg
from bench.service import PG_URL, _prepare_postgres


def commit_cost(commits: int = 200, rounds: int = 3) -> dict[str, object]:
    """Median milliseconds per commit of a one-row UPDATE, durable and not, ``rounds`` alternating rounds each."""
    _prepare_postgres()
    url = make_url(PG_URL).set(drivername="postgresql")
    per: dict[str, list[float]] = {"on": [], "off": []}
    with psycopg.connect(url.render_as_string(hide_password=False)) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS commit_probe (id int PRIMARY KEY, n int NOT NULL)")
        conn.execute("INSERT INTO commit_probe VALUES (1, 0) ON CONFLICT DO NOTHING")
        conn.commit()
        for _ in range(rounds):
            for mode in ("on", "off"):
                conn.execute(f"SET synchronous_commit = {mode}")
                conn.commit()
                started = time.perf_counter()
                for _ in range(commits):
                    conn.execute("UPDATE commit_probe SET n = n + 1 WHERE id = 1")
                    conn.commit()
                per[mode].append((time.perf_counter() - started) / commits * 1000)
        conn.execute("DROP TABLE commit_probe")
        conn.commit()
    return {
        "durable_commit_ms": round(statistics.median(per["on"]), 3),
        "async_commit_ms": round(statistics.median(per["off"]), 3),
        "rounds": per,
        "commits_per_round": commits,
        "load": loadavg(),
    }


def _cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commits", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(commit_cost(args.commits, args.rounds), indent=1))


if __name__ == "__main__":
    _cli()
