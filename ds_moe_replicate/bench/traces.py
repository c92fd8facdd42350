"""Routing traces for the benchmarks: the format lives in the library (``ds_moe_replicate.traces``),
since training and evaluation write traces too and the library never imports its benchmarks."""

from ..traces import FORMAT, Trace, TraceRecorder, counts_from_router_logits, load_trace, save_trace

__all__ = ["Trace", "TraceRecorder", "counts_from_router_logits", "save_trace", "load_trace", "FORMAT"]
