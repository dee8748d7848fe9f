"""Training steps and forward passes replayed from captured CUDA graphs; plain eager code elsewhere.

ResNeSt's split-attention blocks and the IICB loss are hundreds of small kernels. Launched one by one from
Python, the GPU spends most of a step waiting for the CPU, and any busy I/O thread holding the GIL stalls
the launches further. A CUDA graph records the kernels once and replays them with a single launch.
"""
import warnings

import torch


class _Replayable:
    """Runs `_eager(inputs)` until the same input shapes have been seen `warmup_steps` times (cuDNN picks
    its algorithms meanwhile), then captures `_captured(static_inputs)` and replays it for those shapes.
    Other shapes run eagerly. If the capture fails, a warning names the reason and everything runs eagerly.
    """

    what = "work"

    def __init__(self, runtime, warmup_steps=3):
        self.use_graph = bool(getattr(runtime, "cuda_graphs", False))
        self.warmup_steps = warmup_steps
        self.graph = None
        self.signature, self.seen = None, 0

    def __call__(self, *inputs):
        if not self.use_graph:
            return self._eager(inputs)
        signature = tuple((tuple(t.shape), t.dtype, t.stride()) for t in inputs)
        if self.graph is not None:
            return self._replay(inputs) if signature == self.signature else self._eager(inputs)
        self.seen = self.seen + 1 if signature == self.signature else 1
        self.signature = signature
        if self.seen <= self.warmup_steps:
            return self._warmup(inputs)
        captured = self._capture(inputs)
        return captured if captured is not None else self._eager(inputs)

    def _warmup(self, inputs):
        return self._eager(inputs)

    def _capture(self, inputs):
        self.static_inputs = [t.clone() for t in inputs]
        self._before_capture()
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize()
            # thread_local: loader or I/O threads may allocate memory while this thread captures
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self._captured(self.static_inputs)
        except Exception as error:  # an op that syncs with the host or changes shape cannot be captured
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            warnings.warn(f"CUDA graph capture of the {self.what} failed ({reason}); going on without graphs "
                          "(set cuda_graphs: false to skip the attempt).", RuntimeWarning)
            self.use_graph, self.graph, self.static_inputs = False, None, None
            self._after_failed_capture()
            torch.cuda.synchronize()
            return None
        self.graph = graph
        self.static_outputs = outputs
        self._after_capture()
        return self._replay(inputs)

    def _replay(self, inputs):
        for static, new in zip(self.static_inputs, inputs):
            static.copy_(new, non_blocking=True)
        self._before_replay()
        self.graph.replay()
        return self._replayed_outputs()

    def _before_capture(self):
        pass

    def _after_capture(self):
        pass

    def _after_failed_capture(self):
        pass

    def _before_replay(self):
        pass

    def _replayed_outputs(self):
        return self.static_outputs


class TrainStep(_Replayable):
    """`step(*inputs)` runs forward, loss and backward and leaves the gradients in `.grad`.

    forward_loss(*inputs) returns a tuple of tensors whose first element is the loss; the step returns
    them detached. With graphs on, the returned tensors are overwritten by the next step: read them first.
    The optimiser step stays outside, so learning-rate schedules, clipping and checkpoints work as usual.
    """

    what = "training step"

    def __init__(self, forward_loss, parameters, runtime, scaler=None, warmup_steps=3):
        super().__init__(runtime, warmup_steps)
        self.forward_loss = forward_loss
        self.parameters = [p for p in parameters if p.requires_grad]
        self.scaler = scaler

    def _eager(self, inputs):
        for param in self.parameters:
            param.grad = None
        outputs = self.forward_loss(*inputs)
        loss = outputs[0]
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return tuple(t.detach() for t in outputs)

    def _warmup(self, inputs):
        # The documented recipe: warm-up iterations off the default stream (lazy initialisation, autotuning).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self._eager(inputs)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def _before_capture(self):
        for param in self.parameters:
            param.grad = None  # backward inside the graph allocates the gradients it overwrites on each replay

    def _captured(self, static_inputs):
        outputs = self.forward_loss(*static_inputs)
        outputs[0].backward()
        return tuple(t.detach() for t in outputs)

    def _after_capture(self):
        self.static_grads = [param.grad for param in self.parameters]

    def _after_failed_capture(self):
        for param in self.parameters:
            param.grad = None

    def _before_replay(self):
        for param, grad in zip(self.parameters, self.static_grads):
            param.grad = grad  # an eager step in between may have replaced them


class GraphedForward(_Replayable):
    """`forward(batch)` is `function(batch)` without gradients, replayed from a graph for repeated shapes.

    Callers keep the batch shape fixed (pad a short last batch) to stay on the graph. The result is a copy,
    safe to keep.
    """

    what = "forward pass"

    def __init__(self, function, runtime, warmup_steps=2):
        super().__init__(runtime, warmup_steps)
        self.function = function

    @torch.no_grad()
    def _eager(self, inputs):
        return self.function(*inputs)

    @torch.no_grad()
    def _captured(self, static_inputs):
        return self.function(*static_inputs)

    def _replayed_outputs(self):
        return self.static_outputs.clone()
