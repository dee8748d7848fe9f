"""Training steps and forward passes: eager on CPUs, replayed from CUDA graphs on GPUs with the same results.

Written with unittest so that the GPU half also runs where pytest is not installed:
    python -m unittest tests.test_cuda_graphs -v
"""
import copy
import sys
import unittest
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.dpr import DPR  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.cuda_graphs import GraphedForward, TrainStep  # noqa: E402
from utils.runtime import Runtime, setup_runtime  # noqa: E402
from utils.stage2.losses import IICBLoss  # noqa: E402


def small_segmenter(seed=0):
    torch.manual_seed(seed)
    model = DPR("resnet10t", 2)
    for module in model.modules():  # dropout draws random numbers differently when replayed
        if isinstance(module, nn.Dropout2d):
            module.p = 0.0
    return model


def segmenter_loss(model, runtime):
    criterion = IICBLoss()

    def forward_loss(images, masks):
        with runtime.autocast():
            outputs = model(images)
        return (criterion(outputs["main"].float(), masks)[0] + 0.4 * criterion(outputs["aux"].float(), masks)[0],)

    return forward_loss


def batches(device, sizes, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for size in sizes:
        images = torch.randn(size, 3, 64, 64, generator=generator)
        masks = torch.randint(0, 2, (size, 64, 64), generator=generator)
        yield images.to(device).contiguous(memory_format=torch.channels_last), masks.to(device)


def train(model, runtime, sizes, forward_loss=None):
    """SGD over the given batch sizes through TrainStep; returns the step and the loss of every batch."""
    model.to(runtime.device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    step = TrainStep(forward_loss or segmenter_loss(model, runtime), model.parameters(), runtime)
    losses = []
    for images, masks in batches(runtime.device, sizes):
        loss, = step(images, masks)
        losses.append(loss.item())
        optimizer.step()
    return step, losses


class EagerStepTest(unittest.TestCase):
    def test_gradients_match_a_plain_backward(self):
        runtime = Runtime(torch.device("cpu"), None)
        model, reference = small_segmenter(), small_segmenter()
        model.train(), reference.train()
        images, masks = next(batches("cpu", [4]))
        step = TrainStep(segmenter_loss(model, runtime), model.parameters(), runtime)
        for param in model.parameters():  # stale gradients from before must not be accumulated into
            param.grad = torch.ones_like(param)
        loss, = step(images, masks)
        self.assertFalse(loss.requires_grad)
        reference_loss, = segmenter_loss(reference, runtime)(images, masks)
        reference_loss.backward()
        self.assertAlmostEqual(loss.item(), reference_loss.item(), places=5)
        for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
            if ref.grad is None:
                self.assertIsNone(param.grad, name)
            else:
                torch.testing.assert_close(param.grad, ref.grad, msg=name)

    def test_frozen_parameters_get_no_gradient(self):
        runtime = Runtime(torch.device("cpu"), None)
        model = small_segmenter()
        for param in model.encoder.parameters():
            param.requires_grad_(False)
        images, masks = next(batches("cpu", [2]))
        TrainStep(segmenter_loss(model, runtime), model.parameters(), runtime)(images, masks)
        self.assertTrue(all(p.grad is None for p in model.encoder.parameters()))
        self.assertTrue(all(p.grad is not None for p in model.main_head.parameters()))

    def test_forward_without_graphs_is_the_plain_forward_without_gradients(self):
        runtime = Runtime(torch.device("cpu"), None)
        model = small_segmenter().eval()
        images, _ = next(batches("cpu", [3]))
        forward = GraphedForward(model, runtime)
        for _ in range(4):  # well past the warm-up count: still eager, still equal
            logits = forward(images)
            self.assertFalse(logits.requires_grad)
            torch.testing.assert_close(logits, model(images).detach())
        self.assertIsNone(forward.graph)

    def test_graphs_are_off_without_a_cuda_gpu_or_with_several_processes(self):
        cfg = load_config(None, ["device=cpu", "cuda_graphs=true"])
        self.assertFalse(setup_runtime(cfg).cuda_graphs)
        self.assertFalse(TrainStep(lambda: None, [], setup_runtime(cfg)).use_graph)


@unittest.skipUnless(torch.cuda.is_available(), "needs a CUDA GPU")
class GraphStepTest(unittest.TestCase):
    def runtimes(self, precision=None):
        device = torch.device("cuda")
        return Runtime(device, precision, cuda_graphs=False), Runtime(device, precision, cuda_graphs=True)

    def test_replayed_training_matches_eager_training(self):
        # full batches, a short batch (eager in between replays), then full batches again
        sizes = [4, 4, 4, 4, 4, 4, 3, 4, 4, 4]
        for precision in (None, torch.bfloat16):
            eager_runtime, graph_runtime = self.runtimes(precision)
            eager_model = small_segmenter()
            graph_model = copy.deepcopy(eager_model)
            _, eager_losses = train(eager_model, eager_runtime, sizes)
            step, graph_losses = train(graph_model, graph_runtime, sizes)
            self.assertIsNotNone(step.graph, "the step was never captured")
            tolerance = 1e-3 if precision is None else 3e-2
            for eager_loss, graph_loss in zip(eager_losses, graph_losses):
                self.assertAlmostEqual(eager_loss, graph_loss, delta=tolerance * max(1.0, abs(eager_loss)))
            for (name, a), b in zip(eager_model.state_dict().items(), graph_model.state_dict().values()):
                if a.is_floating_point():
                    torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance, msg=name)

    def test_replayed_forward_matches_eager_forward_and_its_results_can_be_kept(self):
        eager_runtime, graph_runtime = self.runtimes(torch.bfloat16)
        model = small_segmenter().to(graph_runtime.device).eval().to(memory_format=torch.channels_last)
        forward = GraphedForward(model, graph_runtime)
        sizes = [4, 4, 4, 4, 2, 4, 4]  # warm-up, capture, replay, an eager short batch, replays
        kept = []
        for images, _ in batches("cuda", sizes):
            with graph_runtime.autocast():
                kept.append((images, forward(images)))
        self.assertIsNotNone(forward.graph, "the forward pass was never captured")
        with torch.no_grad(), eager_runtime.autocast():
            for images, logits in kept:  # earlier results were not overwritten by later replays
                torch.testing.assert_close(logits.float(), model(images).float(), rtol=2e-2, atol=2e-2)

    def test_a_step_that_cannot_be_captured_falls_back_with_a_warning(self):
        eager_runtime, graph_runtime = self.runtimes()
        eager_model = small_segmenter()
        graph_model = copy.deepcopy(eager_model)

        def syncing_loss(model, runtime):
            plain = segmenter_loss(model, runtime)

            def forward_loss(images, masks):
                loss, = plain(images, masks)
                if loss.item() < 0:  # reading a value on the host is not allowed inside a capture
                    raise AssertionError("a loss is never negative")
                return (loss,)
            return forward_loss

        sizes = [4] * 6
        _, eager_losses = train(eager_model, eager_runtime, sizes, syncing_loss(eager_model, eager_runtime))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step, graph_losses = train(graph_model, graph_runtime, sizes, syncing_loss(graph_model, graph_runtime))
        self.assertFalse(step.use_graph)
        self.assertTrue(any("CUDA graph capture" in str(w.message) for w in caught))
        for eager_loss, graph_loss in zip(eager_losses, graph_losses):
            self.assertAlmostEqual(eager_loss, graph_loss, delta=1e-3 * max(1.0, abs(eager_loss)))


if __name__ == "__main__":
    unittest.main()
