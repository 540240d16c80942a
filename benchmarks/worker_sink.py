"""Overhead of the worker's database metric sink against a bare erpd stage, in the same run.

    python benchmarks/worker_sink.py [--epochs 8] [--repeats 2] [--database-url URL]

Pretrains the tiny base and samples one fixed batch, then trains the same stage-1 teacher
`--repeats` times with erpd's NullSink and with worker.sinks.DbSink writing to a fresh
database (default: a SQLite file; pass a postgresql+psycopg URL for Postgres). Prints the wall
time of each and the ratio (DbSink / NullSink): the price of live metrics, heartbeats and
cancel checks.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from erpd import metrics as M
from erpd.config import BaseTrainConfig, PipelineConfig, Stage1Config
from erpd.pretrain import pretrain_base
from erpd.spec import sample_batch
from erpd.stage import StageEnv
from erpd.stage1 import run_stage1
from server.db import Dataset, Model, RunKind, make_engine, migrate, session_factory
from server.services import claim_run, create_run, ensure_builtins
from worker.sinks import DbSink


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--database-url")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    cfg = PipelineConfig.model_validate(
        {
            "sample": {"num_prompts": 64, "group_size": 8},
            "eval": {"size": 100},
            "runtime": {"device": "cpu"},
        }
    )
    env = StageEnv.of(cfg)
    base = pretrain_base(
        shape=cfg.model.tiny,
        cfg=BaseTrainConfig(target_acc=0.3, eval_size=100),
        env=env,
        out_dir=tmp / "base",
    ).checkpoint
    assert base is not None
    batch = sample_batch(base, tmp / "batch", cfg, env)
    stage = Stage1Config(epochs=args.epochs, eval_every_epochs=args.epochs)
    engine = make_engine(args.database_url or f"sqlite:///{tmp}/bench.db")
    migrate.upgrade(engine)
    factory = session_factory(engine)
    with factory.begin() as s:
        ensure_builtins(s)
        model, dataset = s.query(Model).one().id, s.query(Dataset).one().id

    def timed(sink: M.MetricSink, name: str) -> float:
        shutil.rmtree(tmp / name, ignore_errors=True)
        env.sink = sink
        started = time.perf_counter()
        run_stage1(pi_k=base, batch=batch, cfg=stage, env=env, run_dir=tmp / name, run=name)
        sink.close()
        return time.perf_counter() - started

    bare, with_db, points = [], [], 0
    for i in range(args.repeats):
        bare.append(timed(M.NullSink(), f"bare-{i}"))
        with factory.begin() as s:
            run = create_run(s, kind=RunKind.STAGE1, model_id=model, dataset_id=dataset, config={})
            claim_run(s, run_id=run.id, worker="bench", device="cpu")
        sink = DbSink(factory, run.id, 1, heartbeat_s=5)
        sink.start()
        env.should_stop = sink.should_stop
        with_db.append(timed(sink, f"db-{i}"))
        sink.stop()
        env.should_stop = None
        points = sink.points_written
    b, d = min(bare), min(with_db)
    url = engine.url.render_as_string(hide_password=True)
    print(f"stage 1, {args.epochs} epochs on 64x8 responses; best of {args.repeats}; store {url}")
    print(f"bare erpd (NullSink) {b:7.2f} s")
    print(f"worker DbSink        {d:7.2f} s   ({points:,} points)")
    print(f"ratio DbSink / bare  {d / b:7.3f}")
    engine.dispose()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
