"""Host offload of what a computation keeps for backward (``train.memory.offload_ffn``: what the
recomputing SwiGLUs keep; Megatron's fine-grained activation offloading): inside ``hooks()`` every
tensor autograd saves is copied to
pinned host memory on a side stream as it is saved, and its device memory returns to the caching
allocator once the copy is done; backward copies it back to the device when it needs it (on the
compute stream, after the side stream's copy). Where tensors already live in host memory (CPU
training) nothing moves.
"""

from __future__ import annotations

import torch


class HostOffload:
    def __init__(self):
        self.stream: torch.cuda.Stream | None = None

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        if not tensor.is_cuda:
            return tensor
        if self.stream is None:
            self.stream = torch.cuda.Stream(tensor.device)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        tensor.record_stream(self.stream)  # its block is not reused before the copy has read it
        return host, done, tensor.device

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        host, done, device = packed
        torch.cuda.current_stream(device).wait_event(done)
        return host.to(device, non_blocking=True)
