"""Streaming: train and evaluate on tables larger than memory, chunk by chunk.

:func:`load_table_streaming` makes one pass over the files (:func:`dtn.data.tabular.scan_chunks`)
that fits the encoders, checks every cell and counts each chunk's rows per split; nothing
else is kept in memory. Each split is then a :class:`StreamingSplit`, which the trainer uses
in place of an in-memory :class:`dtn.data.EncodedData`: ``batches()`` reads the chunks again
(every epoch) through :class:`ChunkStream`, a ``torch.utils.data.IterableDataset`` that
encodes each chunk with the fitted encoders and cuts it into batches.

Sharding: chunks are divided among DataLoader workers (``data.num_workers``) and among the
ranks of a ``torchrun`` job; the encoder fit is then distributed too (every rank scans its
chunks, the exact fit states are merged), giving the same encoders as a single process.

In order (no shuffle), one process and no workers, the batches are exactly those of the
in-memory path. Shuffling permutes the chunk order and the rows within each chunk (a
chunk-local shuffle, not a global one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import distributed as D
from ..features import Schema
from .encoders import DataError, EncodedData, FitState, TabularEncoder
from .tabular import SPLITS, Chunk, TableSchema, TableSource, scan_chunks, source_fingerprint


class ChunkStream(IterableDataset):
    """Batches of ``batch_size`` rows of one split, read from ``chunks`` in order.

    Rows carry over from one chunk to the next, so every batch but the last is full. With
    ``seed`` set, the rows of each chunk are permuted (by a generator fixed by the seed and the
    chunk). Under a DataLoader with workers, worker w reads every num_workers-th chunk.
    """

    def __init__(self, source: TableSource, encoder: TabularEncoder, split: str, chunks: list[Chunk],
                 batch_size: int, seed: int | None = None):
        super().__init__()
        self.source, self.encoder, self.split = source, encoder, split
        self.code = SPLITS.index(split)
        self.chunks, self.batch_size, self.seed = list(chunks), batch_size, seed

    def __iter__(self):
        info = get_worker_info()
        chunks = self.chunks if info is None else self.chunks[info.id::info.num_workers]
        b = self.batch_size
        pending: EncodedData | None = None
        for chunk in chunks:
            for piece, df in enumerate(self.source.read(chunk)):
                part = df[self.source.split_codes(df, chunk) == self.code]
                if not len(part):
                    continue
                enc = self.encoder.transform(part, source=chunk.file)
                if self.seed is not None:
                    g = torch.Generator().manual_seed((self.seed + 1_000_003 * chunk.id + 7919 * piece) % (2**63))
                    enc = enc.take(torch.randperm(len(enc), generator=g))
                buf = enc if pending is None else EncodedData.concat([pending, enc])
                full = len(buf) // b
                for i in range(full):
                    yield buf.batch(slice(i * b, (i + 1) * b))
                pending = buf.take(slice(full * b, None)) if len(buf) > full * b else None
        if pending is not None:
            yield pending.batch(slice(None))


class StreamingSplit:
    """One split of a streamed table, with the interface the trainer uses: ``len()``,
    ``batches(batch_size, shuffle, generator, rank, world_size)``, ``num_batches()``, ``shard()``."""

    def __init__(self, source: TableSource, encoder: TabularEncoder, split: str, chunks: list[Chunk],
                 num_workers: int = 0):
        self.source, self.encoder, self.split = source, encoder, split
        self.chunks = [c for c in chunks if c.rows.get(split, 0) > 0]
        self.num_workers = num_workers

    def __len__(self) -> int:
        return sum(c.rows[self.split] for c in self.chunks)

    def shard(self, rank: int, world_size: int) -> "StreamingSplit":
        """Rank ``rank``'s chunks (every world_size-th), e.g. for a data-parallel evaluation."""
        if world_size <= 1:
            return self
        return StreamingSplit(self.source, self.encoder, self.split, self.chunks[rank::world_size], self.num_workers)

    def _plan(self, chunks: list[Chunk], batch_size: int, world_size: int):
        """(rows per rank, per-rank batch size, steps every rank takes)."""
        if world_size <= 1:
            n = sum(c.rows[self.split] for c in chunks)
            return [n], batch_size, math.ceil(n / batch_size)
        b = max(1, batch_size // world_size)
        rows = [sum(c.rows[self.split] for c in chunks[r::world_size]) for r in range(world_size)]
        return rows, b, max(math.ceil(n / b) for n in rows)

    def num_batches(self, batch_size: int, world_size: int = 1) -> int:
        return self._plan(self.chunks, batch_size, world_size)[2]

    def _stream(self, chunks, batch_size: int, seed):
        stream = ChunkStream(self.source, self.encoder, self.split, chunks, batch_size, seed)
        if self.num_workers > 0 and len(chunks) > 1:
            return iter(DataLoader(stream, batch_size=None, num_workers=min(self.num_workers, len(chunks))))
        return iter(stream)

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                rank: int = 0, world_size: int = 1):
        """Batches of the split. With ``world_size`` > 1 this rank reads its share of the chunks in
        batches of ``batch_size // world_size`` rows (one global batch per step across ranks); every
        rank takes the same number of steps, so a rank with fewer rows starts over on its chunks
        (as DistributedSampler pads by repeating)."""
        chunks = list(self.chunks)
        seed = None
        if shuffle:
            chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=generator).tolist()]
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        if world_size <= 1:
            yield from self._stream(chunks, batch_size, seed)
            return
        rows, b, steps = self._plan(chunks, batch_size, world_size)
        if min(rows) == 0:
            raise DataError(f"{self.split}: {len(chunks)} chunk(s) of {self.split} rows cannot feed {world_size} ranks; "
                            "lower chunk_rows (CSV) or write smaller Parquet row groups")
        mine = chunks[rank::world_size]
        done = 0
        while done < steps:
            for item in self._stream(mine, b, seed):
                yield item
                done += 1
                if done == steps:
                    return


@dataclass
class StreamingData:
    """A streamed table: schema, fitted encoder and the three splits (no frames in memory)."""

    schema: Schema
    encoder: TabularEncoder
    train: StreamingSplit
    valid: StreamingSplit
    test: StreamingSplit
    source: TableSource
    chunks: list[Chunk]
    fingerprint: Optional[dict] = None  # where the rows came from (dtn.data.tabular.source_fingerprint)


def load_table_streaming(ts: TableSchema, encoder: TabularEncoder | None = None, num_workers: int = 0,
                         progress: bool = True) -> StreamingData:
    """Index the files, then one pass over the chunks (shared among the ranks of a distributed job):
    fit the encoders on the train rows (or check the rows against ``encoder``) and count every
    chunk's rows per split."""
    source = TableSource(ts)
    chunks = source.chunks()
    rank, world = D.rank_and_world()
    fit = encoder is None
    enc = encoder if encoder is not None else TabularEncoder(ts.feature_schema())
    mine = chunks[rank::world]
    error = None
    try:
        scan_chunks(source, enc, mine, fit=fit, progress=progress and rank == 0)
    except (DataError, ValueError, OSError) as exc:
        if world == 1:
            raise
        error = exc
    state = (getattr(enc, "fit_state", None) or FitState()) if fit else None
    gathered = D.all_gather_objects({"rows": {c.id: c.rows for c in mine}, "state": state,
                                     "error": None if error is None else (type(error).__name__, str(error))})
    failed = [(r, g["error"]) for r, g in enumerate(gathered) if g["error"] is not None]
    if failed:
        if error is not None:
            raise error
        r, (_, msg) = failed[0]
        raise DataError(f"rank {r} failed reading its chunks: {msg}")
    for g in gathered:
        for cid, rows in g["rows"].items():
            chunks[cid].rows = rows
    if fit:
        merged = FitState()
        for g in gathered:
            merged.merge(g["state"])
        if merged.rows == 0:
            raise DataError(f"{', '.join(ts.train)}: no training rows")
        enc.finish_fit(state=merged)
    splits = {s: StreamingSplit(source, enc, s, chunks, num_workers) for s in SPLITS}
    return StreamingData(enc.schema, enc, splits["train"], splits["valid"], splits["test"], source, chunks,
                         source_fingerprint(ts))


__all__ = ["ChunkStream", "StreamingSplit", "StreamingData", "load_table_streaming"]
