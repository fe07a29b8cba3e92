"""CUDA events for overlapping communication with compute: DeepEP's EventHandle and EventOverlap, over
torch.cuda.Event."""
import torch


class EventHandle:
    """A CUDA event recorded at construction on `stream` (default: the current stream)."""

    def __init__(self, stream=None):
        self.cuda_event = torch.cuda.Event()
        self.cuda_event.record(stream if stream is not None else torch.cuda.current_stream())

    def current_stream_wait(self):
        torch.cuda.current_stream().wait_event(self.cuda_event)


def cuda_event_of(previous_event):
    """The torch.cuda.Event behind an EventOverlap, an EventHandle or a torch.cuda.Event (None for None)."""
    if previous_event is None:
        return None
    event = getattr(previous_event, "event", previous_event)  # EventOverlap -> EventHandle
    event = getattr(event, "cuda_event", event)  # EventHandle -> torch.cuda.Event
    if event is None:
        raise ValueError("previous_event: it holds no event (was the operation that made it run with "
                         "async_finish=True?)")
    if not isinstance(event, torch.cuda.Event):
        raise TypeError(f"previous_event: expected an EventOverlap, EventHandle or torch.cuda.Event, "
                        f"got {type(previous_event).__name__}")
    return event


class EventOverlap:
    """The event an operation returns (holding one only with async_finish=True), and the tensors that must
    stay alive until it completes (`extra_tensors`: a CUDA-graph-safe stand-in for record_stream).

    `with event: ...` runs the block, then makes the current stream wait for the event."""

    def __init__(self, event=None, extra_tensors=None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self):
        if self.event is None:
            raise RuntimeError("EventOverlap.current_stream_wait: no event (the operation ran with "
                               "async_finish=False, so the current stream already waits for it)")
        self.event.current_stream_wait()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        if self.event is not None:
            self.event.current_stream_wait()
