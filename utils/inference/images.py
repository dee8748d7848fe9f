"""Plain images: decoded ahead on reader threads, tiles no larger than the window predicted in batches of one
size, larger images by sliding window, their files written on worker threads while the device goes on."""
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from utils.inference.inputs import IO_THREADS
from utils.inference.outputs import write_image_outputs
from utils.inference.summary import error_row, summary_row
from utils.inference.tiles import predict_tile_batch, to_size
from utils.stage2.predict import predict_logits
from utils.stage2.sliding_window import count_windows


class ReadAhead:
    """Images decoded on reader threads in the order they are taken, at most `ahead` of the one taken last."""

    def __init__(self, read, jobs, ahead, workers=IO_THREADS):
        self.read, self.jobs = read, jobs
        self.readers = ThreadPoolExecutor(max_workers=workers)
        self.loading = {job.index: self.readers.submit(read, job.path) for job in jobs[:ahead]}
        self.next_to_load = len(self.loading)

    def take(self, job):
        """The future of read(job.path); one more image starts decoding in its place."""
        if self.next_to_load < len(self.jobs):
            upcoming = self.jobs[self.next_to_load]
            self.loading[upcoming.index] = self.readers.submit(self.read, upcoming.path)
            self.next_to_load += 1
        return self.loading.pop(job.index)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.readers.shutdown(wait=True)
        return False


class ImageRunner:
    """Turns plain images into outputs and summary rows with one Segmenter."""

    def __init__(self, segmenter):
        self.segmenter = segmenter
        self.pending = {}  # (h, w) of the images -> [(job, image, network input, seconds so far)]
        # PNG encoding and writing run on worker threads while the device predicts the next batch
        self.writer = ThreadPoolExecutor(max_workers=IO_THREADS)
        self.writes = []  # (future, row): a failed write turns its row into an error row

    def add(self, job, loaded):
        """Predict now (large images) or queue for a batched forward (tiles); returns finished rows.

        `loaded` is the future of segmenter.read(job.path), read ahead on a worker thread. Logits are brought
        back to the image's own size, so masks, probabilities and scores are in the image's pixels.
        """
        seg, batch_size = self.segmenter, self.segmenter.args.batch_size
        start = time.perf_counter()
        try:
            image, network_input = loaded.result()
        except Exception as error:  # any unreadable file becomes an error row, never a crash
            return [error_row(seg.classes, job, "image", error)]
        height, width = network_input.shape[:2]
        if height <= seg.window and width <= seg.window:
            key = image.shape[:2]  # the network input's size follows from the image's
            group = self.pending.setdefault(key, [])
            group.append((job, image, network_input, time.perf_counter() - start))
            rows = self.flush(key) if len(group) >= batch_size else []
            if sum(len(g) for g in self.pending.values()) > 4 * batch_size:
                rows += self.flush(max(self.pending, key=lambda k: len(self.pending[k])))
            return rows
        try:
            logits = predict_logits(seg.model, network_input, seg.runtime, seg.window, seg.overlap, batch_size,
                                    seg.mean, seg.std, len(seg.classes))
            masks, raw, fractions, probs = seg.decide(to_size(logits, image.shape[:2]))
        except torch.OutOfMemoryError:
            return [error_row(seg.classes, job, "image", f"{job.path}: out of memory on {seg.runtime.device}; "
                              "lower --batch-size or use --device cpu.")]
        return [self.finish(job, "image", image, (height, width), masks[0], raw[0], fractions[0],
                            None if probs is None else probs[0], start, time.perf_counter() - start)]

    def flush(self, key):
        """Predict the queued tiles of one size in one batch."""
        seg = self.segmenter
        group = self.pending.pop(key, [])
        if not group:
            return []
        start = time.perf_counter()
        try:
            logits = predict_tile_batch(seg.forward, [network_input for _, _, network_input, _ in group],
                                        seg.runtime, seg.window, seg.mean, seg.std, seg.args.batch_size)
            masks, raw, fractions, probs = seg.decide(to_size(logits, key))
        except torch.OutOfMemoryError:
            return [error_row(seg.classes, job, "tile", f"{job.path}: out of memory on {seg.runtime.device}; "
                              "lower --batch-size.") for job, _, _, _ in group]
        share = (time.perf_counter() - start) / len(group)
        return [self.finish(job, "tile", image, network_input.shape[:2], masks[i], raw[i], fractions[i],
                            None if probs is None else probs[i], time.perf_counter(), read_seconds + share)
                for i, (job, image, network_input, read_seconds) in enumerate(group)]

    def flush_all(self):
        rows = []
        for key in list(self.pending):
            rows += self.flush(key)
        return rows

    def finish(self, job, kind, image, network_size, mask, raw, fractions, probs, write_start, seconds):
        """The image's row (scored against its mask when there is one); its files are queued for writing."""
        seg = self.segmenter
        paths = seg.paths(job)
        height, width = mask.shape
        windows = count_windows(*network_size, seg.window, seg.overlap)
        row = summary_row(seg.classes, job, kind, "ok", width, height, seconds + time.perf_counter() - write_start,
                          fractions, 1, (windows, windows), seg.image_mpp())
        if seg.scorer is not None:
            row.update(seg.scorer.add(seg.masks[job.index], raw, mask if seg.fill else None, job.name))
        self.writes.append((self.writer.submit(write_image_outputs, seg, job, paths, image, mask, probs), row))
        return row

    def finish_writes(self):
        """Wait for every queued write; rows of failed writes become error rows."""
        for future, row in self.writes:
            error = future.result()
            if error:
                row["status"] = "error: " + " ".join(error.split())
        self.writes = []
        self.writer.shutdown(wait=True)
