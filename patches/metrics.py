"""Observability: one Kara log line per decode-log interval, and Prometheus counters.

Wraps ``sglang.srt.managers.scheduler_components.metrics_reporter.SchedulerMetricsReporter.
report_decode_stats`` (AFTER), on SGLang's own cadence (``--decode-log-interval``). With
``--enable-metrics`` the counters appear on ``/metrics``.
"""

from kara_patches._patch import Patch
from kara_sglang import adapter


def _report(result, reporter, *args, **kwargs):
    runtime = adapter.current()
    if runtime is not None:
        interval = getattr(reporter, "decode_log_interval", 40) or 40
        runtime.report(getattr(reporter, "forward_ct_decode", 0) % interval == 0,
                       getattr(reporter, "enable_metrics", False))
    return result


PATCHES = (Patch("sglang.srt.managers.scheduler_components.metrics_reporter.SchedulerMetricsReporter."
                 "report_decode_stats", "AFTER", _report),)
