"""asyncpg through pgcache in transaction mode: its statement cache (named server-side statements),
explicit prepare, transactions and many concurrent queries over a small pool. Exits non-zero on any
wrong result. Usage: asyncpg_check.py DSN"""
import asyncio
import sys

import asyncpg

DSN = sys.argv[1]


async def worker(pool, n):
    async with pool.acquire() as conn:
        for i in range(30):
            v = await conn.fetchval("select $1::int + $2::int", i, n)
            assert v == i + n, v
        stmt = await conn.prepare("select $1::text || '-' || $2::text")
        assert await stmt.fetchval("a", str(n)) == f"a-{n}"
        async with conn.transaction():
            await conn.execute("insert into drv_asyncpg values ($1)", n)
            c = await conn.fetchval("select count(*) from drv_asyncpg where w = $1", n)
            assert c == 1, c
        rows = await conn.fetch("select g from generate_series(1, $1::int) g", 100)
        assert [r["g"] for r in rows] == list(range(1, 101))


async def main():
    conn = await asyncpg.connect(DSN)
    await conn.execute("drop table if exists drv_asyncpg; create table drv_asyncpg (w int)")
    await conn.close()
    pool = await asyncpg.create_pool(DSN, min_size=4, max_size=10)
    await asyncio.gather(*(worker(pool, n) for n in range(20)))
    await pool.close()
    print("asyncpg ok")


asyncio.run(main())
