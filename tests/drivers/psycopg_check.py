"""psycopg 3 through pgcache in transaction mode: server-side prepared statements on every query
(prepare_threshold=0), from several connections at once over a small pool. Exits non-zero on any
wrong result. Usage: psycopg_check.py DSN"""
import sys
import threading

import psycopg

DSN = sys.argv[1]
errors = []


def worker(n):
    try:
        with psycopg.connect(DSN, prepare_threshold=0, autocommit=True) as conn:
            for i in range(50):
                row = conn.execute("select %s::int * 2, %s::text", (i, f"w{n}")).fetchone()
                assert row == (i * 2, f"w{n}"), row
            with conn.transaction():
                conn.execute("insert into drv_psycopg values (%s, %s)", (n, "x"))
                row = conn.execute("select count(*) from drv_psycopg where w = %s", (n,)).fetchone()
                assert row[0] >= 1, row
            with conn.cursor() as cur:
                cur.executemany("insert into drv_psycopg values (%s, %s)", [(n, str(j)) for j in range(10)])
            row = conn.execute("select count(*) from drv_psycopg where w = %s", (n,)).fetchone()
            assert row[0] == 11, row
    except Exception as e:  # reported below
        errors.append(f"worker {n}: {e!r}")


with psycopg.connect(DSN, autocommit=True) as c:
    c.execute("drop table if exists drv_psycopg")
    c.execute("create table drv_psycopg (w int, v text)")

# A small statement cache: psycopg drops evicted statements with SQL `DEALLOCATE name`.
with psycopg.connect(DSN, prepare_threshold=0, autocommit=True) as c:
    c.prepared_max = 2
    for round in range(3):
        for k in range(5):
            row = c.execute(f"select %s::int + {k}", (round,)).fetchone()
            assert row == (round + k,), row
threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if errors:
    print("\n".join(errors))
    sys.exit(1)
print("psycopg ok")
