"""``prepare --jobs J``: the shards of one machine as J processes at a time (issue 18), through the
standard library's process pool. Each job is the same ``prepare`` an array-job task runs (passed
in by ``data_pipeline.prepare``, so this module does not import it back), with
its tokenizer threads set to the cores divided among the jobs; one progress bar counts the
documents of all of them. The first failing shard's one-line error stops the command once the
running shards finish (none is left half written: each is complete or absent), so a rerun with
``--shard-index`` fills the gaps. A job process that dies (killed, out of memory) breaks the pool:
the error names every shard that did not finish, to rerun with ``--shard-index``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from tqdm import tqdm

from plugins.errors import ProjectError

_documents = None  # the shared counter, in each job process


def _start_job(counter, threads: int) -> None:
    global _documents
    _documents = counter
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # before the tokenizer's thread pool starts


def _count(n: int) -> None:
    with _documents.get_lock():
        _documents.value += n


def _run(prepare: Callable[..., dict], args: argparse.Namespace, index: int) -> dict:
    return prepare(argparse.Namespace(**{**vars(args), "shard_index": index}), progress=_count)


def run_shards(prepare: Callable[..., dict], args: argparse.Namespace, indices: list[int]) -> list[dict]:
    """``prepare(args, progress)`` of shards ``indices`` with ``args.jobs`` processes (``prepare`` a
    module-level function, pickled by name into each job); their manifests in shard order."""
    jobs = min(args.jobs, len(indices))
    threads = args.workers or max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    counter = context.Value("q", 0)
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_job, initargs=(counter, threads)) as pool, \
            tqdm(desc=f"tokenizing ({jobs} jobs)", unit="doc", disable=None) as bar:
        futures = {pool.submit(_run, prepare, args, index): index for index in indices}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
            bar.update(counter.value - bar.n)
            bar.set_postfix(shards=f"{len(futures) - len(pending)}/{len(futures)}")
            failed = [future for future in done if future.exception() is not None]
            if any(isinstance(future.exception(), BrokenProcessPool) for future in failed):
                wait(pending)  # a broken pool fails every shard it had not finished
                raise _died(args, sorted(index for future, index in futures.items() if future.exception()))
            if failed:
                for future in pending:
                    future.cancel()
                raise failed[0].exception()
    return [future.result() for future in sorted(futures, key=futures.get)]


def _died(args: argparse.Namespace, unfinished: list[int]) -> ProjectError:
    shards = ", ".join(map(str, unfinished))
    return ProjectError(f"--jobs {args.jobs}: a job process died (killed, or out of memory?); shard(s) {shards} of "
                        f"{args.num_shards} did not finish (the others are complete): run the same command with "
                        f"--shard-index I in place of --jobs for I in {shards}")
