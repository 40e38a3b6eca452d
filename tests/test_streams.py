"""The F&B unit's stream ordering (``plugins.parallel.streams``), driven on CPU through a recording
fake of the CUDA streams and events: the code the CUDA path runs, with the order it issues written down."""

import contextlib
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.parallel.expert import ExpertExchange, apply_expert_parallel
from plugins.parallel.streams import StreamOverlap, Streams, communication


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_event(self, event):
        self.log.append(("wait", self.name, event.id))


class FakeEvent:
    def __init__(self, number, log):
        self.id, self.log = number, log

    def record(self, stream):
        self.log.append(("record", stream.name, self.id))


class RecordingStreams(Streams):
    """Streams and events that only write down what was asked of them, and in which order."""

    def __init__(self):
        self.log, self.events, self.streams = [], 0, {}
        self.stack = [FakeStream("main", self.log)]

    def current(self):
        return self.stack[-1]

    def stream(self, name):
        return self.streams.setdefault(name, FakeStream(name, self.log))

    def event(self):
        self.events += 1
        return FakeEvent(self.events, self.log)

    @contextlib.contextmanager
    def use(self, stream):
        self.stack.append(stream)
        try:
            yield
        finally:
            self.stack.pop()

    def keep(self, tensor, stream):
        self.log.append(("keep", stream.name, tuple(tensor.shape)))

    def work(self, what):
        self.log.append(("work", self.current().name, what))


def _waits(log, stream, after):
    """Events ``stream`` waited on that were recorded on ``after``, in order."""
    recorded = {e: s for kind, s, e in log if kind == "record"}
    return [e for kind, s, e in log if kind == "wait" and s == stream and recorded[e] == after]


def test_an_fb_issues_forward_and_backward_on_their_chunks_streams_ordered_by_events():
    streams = RecordingStreams()
    overlap = StreamOverlap(streams)

    def chunk_work(what):
        def fn():
            streams.work(f"{what} compute")
            with communication(torch.zeros(2, 3)):
                streams.work(f"{what} all-to-all")
            streams.work(f"{what} combine")
        return fn

    overlap.pair((0, chunk_work("forward")), (1, chunk_work("backward")))
    log = streams.log
    work = [entry[1:] for entry in log if entry[0] == "work"]
    assert work == [("chunk0", "forward compute"), ("comm0", "forward all-to-all"), ("chunk0", "forward combine"),
                    ("chunk1", "backward compute"), ("comm1", "backward all-to-all"), ("chunk1", "backward combine")]
    # each chunk stream starts after the main stream's prior work (the received inputs) ...
    first_work = {s: log.index(("work", s, w)) for s, w in work}
    for chunk in ("chunk0", "chunk1"):
        wait = _waits(log, chunk, "main")
        assert len(wait) == 1 and log.index(("wait", chunk, wait[0])) < first_work[chunk]
    # ... its all-to-all starts after its compute, and the compute goes on after the all-to-all
    for chunk, comm, what in (("chunk0", "comm0", "forward"), ("chunk1", "comm1", "backward")):
        (start,) = _waits(log, comm, chunk)
        (back,) = _waits(log, chunk, comm)
        assert log.index(("work", chunk, f"{what} compute")) < log.index(("record", chunk, start)) \
            < log.index(("work", comm, f"{what} all-to-all")) < log.index(("record", comm, back)) \
            < log.index(("work", chunk, f"{what} combine"))
        assert ("keep", comm, (2, 3)) in log  # the tensor is not reused before the comm stream is done
    # the main stream (the op's sends) waits for both chunks' streams, after all their work
    assert len(_waits(log, "main", "chunk0")) == len(_waits(log, "main", "chunk1")) == 1
    assert log.index(("wait", "main", _waits(log, "main", "chunk0")[0])) > max(first_work.values())
    # nothing is left issuing: an all-to-all outside an op is on the current stream as before
    assert isinstance(communication(torch.zeros(1)), contextlib.nullcontext)


def test_an_fb_of_one_chunk_is_refused():
    with pytest.raises(ValueError, match="pairs the two chunks"):
        StreamOverlap(RecordingStreams()).pair((0, lambda: None), (0, lambda: None))


def test_the_expert_exchange_issues_every_all_to_all_on_the_communication_side(tiny_config):
    """A real DeepSeekMoE model behind the all-to-all dispatcher (one gloo rank): forward of one
    micro-batch on chunk 0's stream while the backward of another runs on chunk 1's; every
    all-to-all, the backward's included, is issued with a communication stream current."""
    streams = RecordingStreams()
    calls = []
    real = dist.all_to_all_single

    def recording(*args, **kwargs):
        calls.append(streams.current().name)
        return real(*args, **kwargs)

    with tempfile.TemporaryDirectory() as directory:
        dist.init_process_group("gloo", init_method=f"file://{Path(directory) / 'store'}", rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            model = DeepSeekV3(tiny_config)
            group = dist.new_group([0])
            apply_expert_parallel(model, ExpertExchange(group, tiny_config.n_routed_experts, dist.new_group([0])))
            ids = torch.randint(0, tiny_config.vocab_size, (2, 8))
            earlier = model(ids, labels=ids).loss
            dist.all_to_all_single = recording
            overlap = StreamOverlap(streams)
            overlap.pair((0, lambda: model(ids, labels=ids)), (1, lambda: earlier.backward()))
        finally:
            dist.all_to_all_single = real
            dist.destroy_process_group()
    moe_blocks = len(model.moe_layers())
    # per MoE block: forward = counts, rows, combine; backward = the rows' and the combine's reverse
    assert calls.count("comm0") == 3 * moe_blocks and calls.count("comm1") == 2 * moe_blocks
    assert set(calls) == {"comm0", "comm1"}
