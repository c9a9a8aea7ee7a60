"""Build the AU cache for a list of images: parallel, resumable, with a progress bar.

The main process reads and hashes each image and skips those already cached under the current
settings; the rest go in small chunks to N worker processes, each with its own annotator
(mediapipe + AU networks), and come back as records that the main process commits chunk by
chunk. Killing the build loses only the chunks in flight.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import time
from typing import Sequence

from tqdm import tqdm

from tag_lightning.au.annotator import AnnotatorConfig, AUAnnotator, annotator_settings, read_and_hash, source_names
from tag_lightning.au.cache import AUCache, BuildSummary
from tag_lightning.au.record import AURecord
from tag_lightning.images import ImageRef

CHUNK_SIZE = 8  # images per worker task: large enough to batch the AU network, small enough to resume

_worker_annotator: AUAnnotator | None = None


def _limit_threads(config: AnnotatorConfig) -> None:
    """One compute thread per worker process: N workers use N cores, not N x cores."""
    import cv2

    cv2.setNumThreads(1)
    if config.libreface_weights:
        import torch

        torch.set_num_threads(1)


def _init_worker(config: AnnotatorConfig) -> None:
    global _worker_annotator
    _limit_threads(config)
    _worker_annotator = AUAnnotator(config)
    # Close mediapipe when the worker's process ends, before interpreter shutdown: mediapipe's
    # close needs its dispatch threads, which are gone by the time atexit handlers run.
    multiprocessing.util.Finalize(_worker_annotator, _worker_annotator.close, exitpriority=10)


def _annotate_chunk(chunk: list[ImageRef]) -> list[AURecord]:
    return _worker_annotator.annotate(chunk)


def _pending(refs: Sequence[ImageRef], cache: AUCache, settings_key: str, summary: BuildSummary,
             progress: bool) -> list[ImageRef]:
    """Images not yet cached (one per distinct content); cached ones are counted and named.

    Runs before any work starts, in the main thread (SQLite connections stay in their thread);
    it keeps hashes only, the workers read the bytes again from the OS cache.
    """
    pending: list[ImageRef] = []
    queued: set[str] = set()
    named: list[tuple[str, str]] = []
    for ref in tqdm(refs, desc="checking cache", unit="img", disable=not progress, leave=False):
        _, digest = read_and_hash(ref)
        summary.total += 1
        status = cache.status_of(digest, settings_key)
        if status is None and digest not in queued:
            queued.add(digest)
            pending.append(ref)
            continue
        summary.cached += 1
        named.append((ref.name, digest))
        if status is not None:
            summary.statuses[status] += 1
    cache.name_images(named)
    return pending


def build_au_cache(
    refs: Sequence[ImageRef],
    cache_dir: str | os.PathLike,
    config: AnnotatorConfig | None = None,
    workers: int = 1,
    progress: bool = True,
) -> BuildSummary:
    """Annotate every image not yet cached under `config`'s settings; return a summary."""
    config = config or AnnotatorConfig()
    settings_key, settings = annotator_settings(config)
    cache = AUCache(cache_dir, create=True)
    cache.register_build(settings_key, settings)
    summary = BuildSummary(sources=source_names(config), settings_key=settings_key)
    start = time.perf_counter()
    pending = _pending(refs, cache, settings_key, summary, progress)
    chunks = [pending[i:i + CHUNK_SIZE] for i in range(0, len(pending), CHUNK_SIZE)]
    bar = tqdm(total=summary.total, initial=summary.cached, desc="AU cache", unit="img",
               disable=not progress, smoothing=0.1)

    def store(records: list[AURecord]) -> None:
        cache.put_many(records, settings_key)
        summary.computed += len(records)
        summary.statuses.update(r.status for r in records)
        bar.update(len(records))

    if chunks and workers <= 1:  # in this process, with every core its libraries want
        with AUAnnotator(config) as annotator:
            for chunk in chunks:
                store(annotator.annotate(chunk))
    elif chunks:
        # spawn, not fork: mediapipe and torch thread pools do not survive a fork reliably.
        with multiprocessing.get_context("spawn").Pool(min(workers, len(chunks)), _init_worker, (config,)) as pool:
            for records in pool.imap_unordered(_annotate_chunk, chunks):
                store(records)
    bar.close()
    cache.finish_build(settings_key)
    summary.seconds = time.perf_counter() - start
    return summary
