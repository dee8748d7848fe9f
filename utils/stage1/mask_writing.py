"""Stage 1's pseudo-masks on disk: one per training tile, the stitched whole training images for stage 2,
the manifest that ties them to a checkpoint, and the picture of a few of them."""
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.config import background_index, pseudo_mask_dir
from utils.data.imageio import IGNORE_INDEX, read_mask, read_rgb, write_palette_png, write_rgb
from utils.evaluation.metrics import confusion_matrix
from utils.evaluation.postprocess import class_indices, fill_holes
from utils.files import BackgroundWriter
from utils.runtime import loader_options
from utils.stage1.cam import cams_to_masks, heatmap_of
from utils.stage1.class_maps import class_maps, network_input
from utils.stage1.pseudo_masks import mask_settings, pseudo_mask_name, read_manifest, write_manifest
from utils.stage1.stitch import VoteStitcher, patch_votes, vote_mask, weigh_background, whole_image_dir
from utils.training import TrainingError, out_of_memory_message
from utils.visualize import contact_sheet, heat_overlay, mask_picture


class TileSet(torch.utils.data.Dataset):
    """Training tiles for CAM inference: network input, label, original size, index."""

    def __init__(self, items, image_size, mean, std):
        self.items, self.image_size, self.mean, self.std = items, image_size, mean, std

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        image = read_rgb(self.items[index].image)
        tensor = network_input(image, self.image_size, self.mean, self.std)
        return tensor, torch.from_numpy(self.items[index].label), torch.tensor(image.shape[:2]), index


def pseudo_mask_confusion(mask, truth, num_classes):
    """Training pseudo-masks as stage 2 learns from them: pixels a pseudo-mask leaves unlabelled (ignore)
    are not scored, since stage 2 does not learn from them. (Whole val/test images count every pixel.)"""
    return confusion_matrix(mask, np.where(mask == IGNORE_INDEX, IGNORE_INDEX, truth), num_classes)


@torch.no_grad()
def write_pseudo_masks(cfg, model, items, runtime, checkpoint_sha, overwrite=False):
    """Pseudo-masks for the training tiles (this rank's share), scored against train/mask when present."""
    s1, classes = cfg.stage1, cfg.data.classes
    folder = pseudo_mask_dir(cfg)
    previous = read_manifest(folder)
    stitcher = VoteStitcher(items, len(classes)) if s1.stitch_whole_images else None
    # stitching needs every patch's class maps, so nothing is kept from before
    settings = mask_settings(s1)
    reuse = (not overwrite and stitcher is None and previous is not None
             and previous.get("checkpoint_sha256") == checkpoint_sha and previous.get("settings") == settings)
    todo = [i for i, item in enumerate(items)
            if not (reuse and (folder / pseudo_mask_name(item.image)).is_file())]
    runtime.barrier()  # every rank has read the old manifest before rank 0 replaces it
    if runtime.is_main:
        if previous is not None and previous.get("checkpoint_sha256") != checkpoint_sha:  # never without a word
            print(f"{folder} holds the pseudo-masks of another stage-1 checkpoint (run '{previous.get('config')}'); "
                  "this run's replace them")
        folder.mkdir(parents=True, exist_ok=True)
        if not reuse:  # else, once the manifest names this checkpoint, a cut-short run would keep them as its own
            for index in todo:
                (folder / pseudo_mask_name(items[index].image)).unlink(missing_ok=True)
        write_manifest(folder, checkpoint_sha, cfg.name, classes, [], complete=False, settings=settings)
    runtime.barrier()
    # whole batches per rank, each as a single process would form it: masks do not depend on the rank count
    batches = [todo[start:start + s1.cam_batch_size] for start in range(0, len(todo), s1.cam_batch_size)]
    mine = [index for batch in runtime.shard(batches) for index in batch]
    dataset = torch.utils.data.Subset(TileSet(items, s1.image_size, cfg.data.mean, cfg.data.std), mine)
    loader = DataLoader(dataset, batch_size=s1.cam_batch_size, **loader_options(runtime, train=False))
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    samples = []
    background = background_index(classes, cfg.data.background)
    fill = class_indices(classes, s1.pseudo_mask_fill_holes)
    model.eval()
    with BackgroundWriter() as writer:
        for images, labels, sizes, indices in tqdm(loader, desc="pseudo-masks", disable=not runtime.is_main):
            images = images.to(runtime.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            uniform = bool((sizes == sizes[0]).all())
            try:
                cams, _ = class_maps(model, images, tuple(sizes[0].tolist()) if uniform else images.shape[-2:],
                                     labels, s1, runtime)
            except torch.OutOfMemoryError:
                raise TrainingError(out_of_memory_message("stage1.cam_batch_size")) from None
            masks = cams_to_masks(cams, labels, background, s1.background_cam_scale)
            heat = heatmap_of(cams, labels, background)
            masks, heat = masks.cpu().numpy(), heat.cpu().numpy()
            votes = patch_votes(cams, labels.to(cams.device)).cpu().numpy() if stitcher else None
            for row, index in enumerate(indices.tolist()):
                item, mask = items[index], masks[row]
                if not uniform:
                    import cv2
                    height, width = sizes[row].tolist()
                    mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
                    if stitcher:
                        votes_row = np.stack([cv2.resize(v, (width, height)) for v in votes[row]])
                if stitcher:
                    stitcher.add(item, votes_row if not uniform else votes[row])
                mask = fill_holes(mask, fill)
                writer.submit(write_palette_png, folder / pseudo_mask_name(item.image), mask, cfg.data.palette)
                if item.mask is not None:
                    truth = read_mask(item.mask, cfg.data.mask_encoding, len(classes))
                    if truth.shape == mask.shape:
                        confusion += pseudo_mask_confusion(mask, truth, len(classes))
                    else:
                        tqdm.write(f"warning: {item.mask} is not the size of its image; left out of the score.",
                                   file=sys.stderr)
                if len(samples) < s1.samples and item.label.sum() >= 2:  # mixed tiles show the CAM at work
                    samples.append((item, mask, heat[row]))
    kept = sorted(set(range(len(items))) - set(todo))
    for index in runtime.shard(kept):  # masks kept from before still count in the score
        item = items[index]
        if item.mask is not None:
            mask = read_mask(folder / pseudo_mask_name(item.image), "index", len(classes))
            truth = read_mask(item.mask, cfg.data.mask_encoding, len(classes))
            if truth.shape == mask.shape:
                confusion += pseudo_mask_confusion(mask, truth, len(classes))
    confusion = runtime.all_reduce_sum(torch.from_numpy(confusion).to(runtime.device)).cpu().numpy()
    runtime.barrier()
    if runtime.is_main:
        write_manifest(folder, checkpoint_sha, cfg.name, classes,
                       [pseudo_mask_name(item.image) for item in items], complete=True, settings=settings)
    return confusion, samples, len(kept), stitcher


def decided_mask(decided, background, fill, margin):
    """A pseudo-mask from the maps that decide it (background weighed, refined): the best class, holes filled,
    and pixels whose two best maps are closer than `margin` left unlabelled (a filled lumen stays labelled)."""
    mask = vote_mask(decided, background)
    filled = fill_holes(mask, fill)
    if margin > 0:
        second, first = np.sort(decided, axis=0)[-2:]
        filled[((first - second) < margin) & (filled == mask)] = IGNORE_INDEX
    return filled


def write_whole_images(cfg, stitcher, runtime, checkpoint_sha, refiner=None, scale=1.0):
    """The training images put back together from their patches, with pseudo-masks from the patches' stitched
    class maps (whole/img and whole/mask beside the patch pseudo-masks), refined by `refiner` (a LabelRefiner)
    when given, whose affinity head is first fitted on these images' maps. `scale`: the factor at which the
    classifier saw the patches. Returns the confusion matrices of the written masks, and of the unrefined ones
    when there is a refiner, against the images' true masks (None where a patch has no mask)."""
    stitcher.reduce(runtime)
    classes, s1 = cfg.data.classes, cfg.stage1
    if refiner is not None and refiner.propagation is not None:  # every rank fits the same head on the same maps
        losses = refiner.propagation.fit(((stitcher.image(stem), stitcher.stitched_maps(stem))
                                          for stem in stitcher.stems()), scale)
        if runtime.is_main:
            print(f"affinity head trained on {len(stitcher.stems())} whole training images, {len(losses)} epochs "
                  f"(loss {losses[0]:.4f} -> {losses[-1]:.4f})")
    if not runtime.is_main:
        return None
    folder = whole_image_dir(pseudo_mask_dir(cfg))
    settings = mask_settings(s1)
    write_manifest(folder / "mask", checkpoint_sha, cfg.name, classes, [], complete=False, settings=settings)
    background = background_index(classes, cfg.data.background)
    fill = class_indices(classes, s1.pseudo_mask_fill_holes)
    names, unlabelled, pixels = [], 0, 0
    confusions = {"written": np.zeros((len(classes),) * 2, np.int64), "unrefined": np.zeros((len(classes),) * 2, np.int64)}
    scored = True
    with BackgroundWriter() as writer:
        for stem in tqdm(stitcher.stems(), desc="whole images", leave=False):
            image, maps = stitcher.image(stem), stitcher.stitched_maps(stem)
            plain = decided_mask(weigh_background(maps.copy(), background, s1.background_cam_scale), background, fill,
                                 s1.pseudo_mask_ignore_margin)
            mask = plain if refiner is None else decided_mask(refiner.maps(image, maps, stitcher.allowed(stem), scale),
                                                              background, fill, s1.pseudo_mask_ignore_margin)
            truth = stitcher.ground_truth(stem, cfg.data.mask_encoding, len(classes))
            if truth is None:
                scored = False
            else:
                confusions["written"] += pseudo_mask_confusion(mask, truth, len(classes))
                confusions["unrefined"] += pseudo_mask_confusion(plain, truth, len(classes))
            unlabelled, pixels = unlabelled + int((mask == IGNORE_INDEX).sum()), pixels + mask.size
            writer.submit(write_rgb, folder / "img" / f"{stem}.png", image)
            writer.submit(write_palette_png, folder / "mask" / f"{stem}.png", mask, cfg.data.palette)
            names.append(f"{stem}.png")
    write_manifest(folder / "mask", checkpoint_sha, cfg.name, classes, names, complete=True, settings=settings)
    print(f"{len(names)} whole training images and their stitched pseudo-masks written to {folder}"
          f" ({100 * unlabelled / max(pixels, 1):.1f}% of their pixels left unlabelled)")
    if not scored:
        return None
    return confusions["written"], (confusions["unrefined"] if refiner is not None else None)


def save_samples(path, samples, cfg):
    rows = []
    for item, mask, heat in samples:
        image = read_rgb(item.image)
        truth = (mask_picture(read_mask(item.mask, cfg.data.mask_encoding, len(cfg.data.classes)),
                              cfg.data.palette) if item.mask is not None else None)
        rows.append([image, heat_overlay(image, heat), mask_picture(mask, cfg.data.palette), truth])
    if rows:
        contact_sheet(path, rows, ["image", "CAM", "pseudo-mask", "ground truth"])
