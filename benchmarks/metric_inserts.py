"""Metric-point write rate of the run store, against a plain INSERT baseline in the same run.

    python benchmarks/metric_inserts.py [--points 100000] [--dup 0.3]
        [--batch 100 1000 10000] [--json out.json]

Writes `--points` points (a `--dup` share re-reporting a key already written, as a resumed run
does) through `server.services.record_metrics` in batches of `--batch`, on a fresh database of
each backend: the machine's Postgres (ERPD_BENCH_POSTGRES_URL) and a SQLite file. The baseline
is a plain multi-row INSERT of the same number of distinct points into a table without the
unique key (the same Core executemany path), so the ratio is the price of never duplicating a
row.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from common import machine, postgres_database, write_json
from sqlalchemy import Column, Double, Integer, MetaData, String, Table, text

from erpd import metrics as M
from server.db import Dataset, Model, RunKind, make_engine, migrate, session_factory
from server.services import Point, create_run, ensure_builtins, record_metrics

POSTGRES = os.environ.get(
    "ERPD_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
NAMES = [M.KL_EXACT, M.KL_K3, M.ENTROPY_TOKEN, M.LOSS, M.GRAD_NORM, M.RATIO_CLIP_FRAC]


def batches(n: int, dup: float, batch: int, seed: int = 0) -> list[list[Point]]:
    rng = random.Random(seed)
    points, fresh = [], 0
    for _ in range(n):
        if points and rng.random() < dup:
            step, name, _, _ = points[rng.randrange(len(points))]
        else:
            step, name = divmod(fresh, len(NAMES))
            name = NAMES[name]
            fresh += 1
        points.append(Point(step, name, rng.random(), time.time()))
    return [points[i : i + batch] for i in range(0, n, batch)]


def measure(url: str, work: list[list[Point]]) -> dict[str, float]:
    engine = make_engine(url)
    migrate.upgrade(engine)
    factory = session_factory(engine)
    with factory.begin() as s:
        ensure_builtins(s)
        model = s.query(Model).one().id
        dataset = s.query(Dataset).one().id
        run_id = create_run(
            s, kind=RunKind.STAGE1, model_id=model, dataset_id=dataset, config={}
        ).id
    total = sum(len(b) for b in work)
    t0 = time.perf_counter()
    for batch in work:
        with factory.begin() as s:
            record_metrics(s, run_id=run_id, points=batch)
    upsert_s = time.perf_counter() - t0
    with engine.connect() as conn:
        rows = conn.execute(text("select count(*) from metric_points")).scalar_one()

    # baseline: the same number of points, all distinct, plain INSERT into a keyless table
    plain = Table(
        "bench_plain",
        MetaData(),
        Column("run", String(32)),
        Column("name", String(64)),
        Column("step", Integer),
        Column("value", Double),
        Column("wall", Double),
    )
    plain.create(engine)
    t0 = time.perf_counter()
    for b, batch in enumerate(work):
        rows_in = [
            {
                "run": run_id.hex,
                "name": p.name,
                "step": b * 10**6 + i,
                "value": p.value,
                "wall": p.wall_time,
            }
            for i, p in enumerate(batch)
        ]
        with engine.begin() as conn:
            conn.execute(plain.insert(), rows_in)
    plain_s = time.perf_counter() - t0
    engine.dispose()
    return {
        "points": total,
        "rows": rows,
        "upsert_points_per_s": total / upsert_s,
        "plain_points_per_s": total / plain_s,
        "upsert_vs_plain": plain_s / upsert_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--dup", type=float, default=0.3)
    ap.add_argument("--batch", type=int, nargs="+", default=[100, 1_000, 10_000])
    ap.add_argument("--json", type=Path, default=Path("runs/bench/metric_inserts.json"))
    args = ap.parse_args()
    results: list[dict[str, object]] = []
    for size in args.batch:
        work = batches(args.points, args.dup, size)
        with postgres_database(POSTGRES) as pg:
            results.append({"backend": "postgres", "batch": size, **measure(pg, work)})
        with tempfile.TemporaryDirectory() as tmp:
            results.append(
                {"backend": "sqlite", "batch": size, **measure(f"sqlite:///{tmp}/bench.db", work)}
            )
    print(f"{args.points:,} points, {args.dup:.0%} re-reported keys, on {machine()}")
    print(
        f"{'backend':<10}{'batch':>7}{'rows kept':>11}{'upsert pts/s':>14}"
        f"{'plain pts/s':>13}{'ratio':>8}"
    )
    for r in results:
        print(
            f"{r['backend']:<10}{r['batch']:>7,}{r['rows']:>11,}{r['upsert_points_per_s']:>14,.0f}"
            f"{r['plain_points_per_s']:>13,.0f}{r['upsert_vs_plain']:>8.2f}"
        )
    write_json(
        args.json,
        {"machine": machine(), "args": vars(args) | {"json": str(args.json)}, "rows": results},
    )


if __name__ == "__main__":
    main()
