"""Under torchrun: each rank leaves its rows and confusion matrices in files; rank 0 merges them."""
import csv
import json
import time

import numpy as np

from utils.files import write_json
from utils.inference.summary import write_summary


def rank_summary_path(output_dir, rank):
    return output_dir / f"summary.rank{rank}.csv"


def write_rank_results(output_dir, rank, columns, rows, scorer=None):
    """This rank's confusion matrices, then its rows: the rows' file tells rank 0 that this rank is done."""
    if scorer is not None:
        write_json(output_dir / f"confusion.rank{rank}.json",
                   {name: {kind: m.tolist() for kind, m in image.items()} for name, image in scorer.per_image.items()})
    write_summary(rank_summary_path(output_dir, rank), columns, rows)


def merge_rank_summaries(output_dir, world_size, columns, order, poll_seconds=2.0):
    """Rank 0: wait for every rank's rows (a file poll, so slow ranks cannot time out a barrier), merge them."""
    parts = [rank_summary_path(output_dir, rank) for rank in range(world_size)]
    while not all(p.is_file() for p in parts):
        time.sleep(poll_seconds)
    rows = []
    for part in parts:
        with open(part, newline="", encoding="utf-8") as handle:
            rows += list(csv.DictReader(handle))
    rows.sort(key=lambda r: order.get(r["file"], len(order)))  # summary.csv is written once merged with earlier rows
    for part in parts:
        part.unlink()
    return rows


def merge_rank_confusions(output_dir, world_size, scorer):
    """Rank 0: take in the other ranks' per-image confusion matrices (their files exist once their summaries do)."""
    for rank in range(1, world_size):
        part = output_dir / f"confusion.rank{rank}.json"
        for name, image in json.loads(part.read_text()).items():
            scorer.per_image[name] = {kind: np.asarray(m, dtype=np.int64) for kind, m in image.items()}
        part.unlink()
    (output_dir / "confusion.rank0.json").unlink(missing_ok=True)
