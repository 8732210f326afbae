"""``loader_throughput.py --remote``: the training loader over the same reinforced shards read from a local folder,
from an S3 server and from an HTTP server, side by side in one run.

The shards (the embedded digits with fake teacher records, ``loader_throughput.write_fake_shards``, augmentation
``--aug``) are uploaded to moto's standalone S3 server and served by the standard library's ``http.server`` (both
from ``tests/servers.py``, on 127.0.0.1 only; the ``dev`` extra installs moto). The three loaders are ``train.py``'s
(``create_reinforced_loader``, same batch, workers and augmentation); epochs alternate after one untimed warm-up
epoch each. Prints samples/s of each store and the ratios s3 / local and http / local (JSON with ``--output``).

What it measures is the client side of ``dr/storage.py`` (boto3 and urllib, the tamper checks on streamed bytes, and
for ``+mix`` shards the partner reads of ``dr.reinforce.partners``) over loopback, with an emulator on the other end:
no network latency or bandwidth limit, and moto's own per-request cost in the S3 figure. A real bucket adds its
latency per request (once per shard; once per partner that is not in a recently streamed shard).

Examples::

    python benchmarks/loader_throughput.py --remote                          # rrc+ra_re, 2 workers
    python benchmarks/loader_throughput.py --remote --aug rrc+ra_re+mix --output remote_mix.json
"""
import json
import os
import sys
import tempfile
from typing import Any, Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loader_throughput import BenchImages, build_rd_loader, run_rounds, summarise, write_fake_shards  # noqa: E402

from dr import storage  # noqa: E402
from dr.io import atomic_write, software_versions  # noqa: E402
from dr.reinforce.loader import check_reinforced  # noqa: E402

BUCKET = 'bench'
DUMMY_CREDENTIALS = {'AWS_ACCESS_KEY_ID': 'bench', 'AWS_SECRET_ACCESS_KEY': 'bench'}  # the local emulator's only
STORES = ('local', 's3', 'http')


def run_remote(args) -> Dict[str, Any]:
    """The ``--remote`` run of ``loader_throughput.py`` (its parsed ``args``); returns the result dict."""
    from tests.servers import LOOPBACK_S3_ENV, http_server, moto_s3, upload_folder  # the test servers (dev extra)
    images = BenchImages(args.digits_size, args.image_format, args.max_images)
    num_classes = len(images.classes)
    work = args.work_dir or tempfile.mkdtemp(prefix='remote_throughput_')
    rd_dir = write_fake_shards(images, os.path.join(work, 'shards'), args.num_samples, args.topk, args.shard_size,
                               args.seed, aug=args.aug)
    with moto_s3({**LOOPBACK_S3_ENV, **DUMMY_CREDENTIALS}), http_server(work) as web:  # workers inherit the endpoint
        storage.s3_client().create_bucket(Bucket=BUCKET)
        urls = {'local': rd_dir, 's3': upload_folder(rd_dir, f's3://{BUCKET}/rd'), 'http': f'{web}/shards'}
        metas = {k: check_reinforced(u, num_classes) for k, u in urls.items()}
        loaders = {k: build_rd_loader(urls[k], metas[k], num_classes, args) for k in STORES}
        runs = run_rounds({k: (v, v.set_epoch) for k, v in loaders.items()}, args.epochs)
    meta = metas['local']
    summaries = {k: summarise(runs, 'local', k) for k in ('s3', 'http')}
    setting = (f'{meta["num_images"]} images ({args.image_format}, {args.digits_size} px) at {args.img_size} px, '
               f'{args.aug}, batch {args.batch_size}, workers {args.workers}, {len(meta["shards"])} shards of '
               f'{sum(s["bytes"] for s in meta["shards"]) / len(meta["shards"]) / 2 ** 20:.1f} MiB')
    result = {
        'config': dict(vars(args)), 'setting': setting, 'num_images': meta['num_images'],
        'shard_bytes': sum(s['bytes'] for s in meta['shards']), 'device': 'cpu', 'cpu_count': os.cpu_count(),
        'torch_threads': torch.get_num_threads(),
        'samples_per_s': {k: summaries['s3'][k]['samples_per_s'] for k in STORES},
        'ratio_s3_over_local': summaries['s3']['ratio'], 'ratio_http_over_local': summaries['http']['ratio'],
        'paired_median_ratio': {k: summaries[k]['paired_median_ratio'] for k in ('s3', 'http')},
        'runs': runs, 'versions': software_versions(),
    }
    print(f'\n{setting}')
    for name in STORES:
        print(f'{name:>6}: {result["samples_per_s"][name]:8.0f} samples/s')
    for name in ('s3', 'http'):
        print(f'ratio {name} / local: {summaries[name]["ratio"]:.3f} '
              f'(paired median {summaries[name]["paired_median_ratio"]:.3f})')
    if args.output:
        with atomic_write(args.output, 'w') as f:
            json.dump(result, f, indent=2)
    return result
