"""Data at scale: files against shards (``raydino shard``), time to first batch, steady images/s, S3 requests.

For each size N (default 10k, 100k, 1M) an ImageFolder of N small JPEGs (32x32, 10 classes; a few hundred
distinct JPEGs written again and again, so generating a million takes a minute and ~4 GB of disk) and
its shard set (default shard size). Then, on one machine, local disk:

- time to first batch: from naming the data (the source is built: files listed and counted, or the
  manifest read) to the first decoded batch out of Ray Data (``iter_batches``), as a run starts; the median
  of ``--repeats`` starts of each (single starts varied by 1-2 s on 2 busy cores);
- steady images/s: decoded rows per second after the first batch, over ``--steady-images`` rows.

Multi-crop is left out on purpose: it costs the same per image either way (``benchmarks/multicrop_imagenet.py``).

On the loopback S3 server the tests use (moto, behind a proxy that counts what it receives), one whole
pass over ``--s3-images`` images as files and as shards: LIST, HEAD and GET requests per image. The
shards are cut so each holds about ``--s3-images-per-shard`` images (ImageNet's ~110 KB JPEGs give
~2,300 per 256 MB shard).

    python benchmarks/data_scale.py                      # 10k, 100k, 1M: ~15 min on 2 cores, 5 GB of disk
    python benchmarks/data_scale.py --sizes 10000 --s3-images 1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
import ray
import ray.data

from raydino.data.shards import shard_source, write_shards
from raydino.data.sources import imagefolder_dataset

CLASSES = 10
DISTINCT = 500


def _jpegs() -> list[bytes]:
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(DISTINCT):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def make_folder(root: Path, n: int) -> Path:
    """An ImageFolder of ``n`` JPEGs (kept between runs: a ``.complete`` marker says it is whole)."""
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    blobs = _jpegs()
    for c in range(CLASSES):
        (root / f"class{c:02d}").mkdir(parents=True)
    for i in range(n):
        (root / f"class{i % CLASSES:02d}" / f"{i:08d}.jpg").write_bytes(blobs[i % DISTINCT])
    (root / ".complete").write_text(str(n))
    return root


def _first_batch(make_source, batch_size: int) -> tuple[float, object, Iterator[dict]]:
    """Seconds from naming the data to its first decoded batch, the source, and its batches after the first."""
    started = time.perf_counter()
    source = make_source()
    batches = iter(source.dataset.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=4))
    next(batches)
    return time.perf_counter() - started, source, batches


def measure(make_source, steady_images: int, repeats: int, batch_size: int = 256) -> dict[str, float]:
    """Time to the first batch (median of ``repeats`` starts); then, in the last start, rows/s over
    ``steady_images`` rows after as many again (what the pipeline buffered while the first batch was awaited
    is not counted as throughput); a short dataset: what is left."""
    starts = [_first_batch(make_source, batch_size)[0] for _ in range(repeats - 1)]
    seconds, source, iter_batches = _first_batch(make_source, batch_size)
    starts.append(seconds)
    rows, skipped, t0 = 0, 0, None
    for batch in iter_batches:
        if t0 is None:
            skipped += len(batch["label"])
            if skipped >= min(steady_images, source.num_files // 2):
                t0 = time.perf_counter()
            continue
        rows += len(batch["label"])
        if rows >= steady_images:
            break
    steady = rows / (time.perf_counter() - t0) if rows and t0 is not None else float("nan")
    del iter_batches
    return {"first_batch_s": round(float(np.median(starts)), 2), "first_batch_each_s": [round(t, 2) for t in starts],
            "images_per_s": round(steady, 1), "rows": rows}


def local_table(work: Path, sizes: list[int], steady_images: int, repeats: int) -> list[dict[str, object]]:
    rows = []
    for n in sizes:
        t = time.perf_counter()
        folder = make_folder(work / f"files_{n}", n)
        made = time.perf_counter() - t
        shards = work / f"shards_{n}"
        t = time.perf_counter()
        manifest = write_shards(str(folder), str(shards), log=lambda line: print(line, flush=True))
        packed = time.perf_counter() - t
        files = measure(lambda folder=folder: imagefolder_dataset(str(folder)), steady_images, repeats)
        sharded = measure(lambda shards=shards: shard_source(str(shards)), steady_images, repeats)
        row = {"images": n, "shards": len(manifest.shards), "generate_s": round(made, 1), "shard_s": round(packed, 1),
               "files": files, "shards_read": sharded,
               "first_batch_ratio": round(sharded["first_batch_s"] / files["first_batch_s"], 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def s3_table(work: Path, images: int, per_shard: int) -> dict[str, object]:
    from tests.object_store import CREDENTIALS, create_bucket, flaky_s3, moto_endpoint, upload

    folder = make_folder(work / f"s3_files_{images}", images)
    size = sum(p.stat().st_size for p in folder.rglob("*.jpg"))
    shard_mb = size / images * (per_shard + 0.5) / 2**20
    with moto_endpoint() as moto, flaky_s3(moto, every=0) as proxy:
        os.environ.update({**CREDENTIALS, "AWS_ENDPOINT_URL": proxy.endpoint})
        create_bucket("bench")
        upload(str(folder), "s3://bench/files")
        manifest = write_shards("s3://bench/files", "s3://bench/shards", shard_mb, log=lambda _: None)
        out: dict[str, object] = {"images": images, "shards": len(manifest.shards),
                                  "images_per_shard": round(images / len(manifest.shards))}
        for name, make in (("files", lambda: imagefolder_dataset("s3://bench/files")),
                           ("shards", lambda: shard_source("s3://bench/shards"))):
            before = proxy.requests
            rows = sum(len(b["label"]) for b in make().dataset.iter_batches(batch_size=256, batch_format="numpy"))
            counted = {kind: n - before.get(kind, 0) for kind, n in proxy.requests.items() if n > before.get(kind, 0)}
            reads = sum(counted.get(k, 0) for k in ("LIST", "HEAD", "GET"))
            out[name] = {"rows": rows, **counted, "requests_per_image": round(reads / images, 4)}
            print(name, json.dumps(out[name]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--steady-images", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3, help="starts per layout and size (median time to first batch)")
    parser.add_argument("--s3-images", type=int, default=4_000)
    parser.add_argument("--s3-images-per-shard", type=int, default=2_000)
    parser.add_argument("--workdir", default="/tmp/raydino-data-scale", help="kept: the folders are reused")
    parser.add_argument("--buffer-mb", type=int, default=64, help="Ray Data's object store budget (decoded rows ahead)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=os.cpu_count(), configure_logging=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # a bounded buffer, as a training run's consumers keep it: rows decoded ahead while the first batch was
    # awaited are not counted as throughput
    ctx.execution_options.resource_limits = ray.data.ExecutionResources(object_store_memory=args.buffer_mb * 2**20)
    local = local_table(work, args.sizes, args.steady_images, args.repeats)
    s3 = s3_table(work, args.s3_images, args.s3_images_per_shard) if args.s3_images else None
    print(f"\ndata_scale, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, Ray {ray.__version__}; local disk")
    print("| images | files: first batch | shards: first batch | ratio | files: images/s | shards: images/s | "
          "shards | shard_s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in local:
        f, s = r["files"], r["shards_read"]
        print(f"| {r['images']:,} | {f['first_batch_s']:.1f} s | {s['first_batch_s']:.1f} s | {r['first_batch_ratio']:.3f} | "
              f"{f['images_per_s']:,.0f} | {s['images_per_s']:,.0f} | {r['shards']} | {r['shard_s']:.0f} s |")
    if s3:
        print(f"\nS3 (moto on 127.0.0.1, requests counted at a proxy), one pass over {s3['images']:,} images, "
              f"{s3['images_per_shard']:,} images per shard")
        print("| layout | LIST | HEAD | GET | requests per image |")
        print("|---|---|---|---|---|")
        for name in ("files", "shards"):
            c = s3[name]
            print(f"| {name} | {c.get('LIST', 0)} | {c.get('HEAD', 0)} | {c.get('GET', 0)} | {c['requests_per_image']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"local": local, "s3": s3}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
