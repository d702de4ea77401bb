"""Observability: one Kara log line per decode-log interval, and Prometheus counters.

Wraps ``sglang.srt.managers.scheduler_components.metrics_reporter.SchedulerMetricsReporter.
report_decode_stats`` (AFTER), on SGLang's own cadence (``--decode-log-interval``). With
``--enable-metrics`` the counters appear on ``/metrics``.

Parallel servers: under ``--tp-size N`` every rank of a TP group runs the same compressions,
so only the group's first rank (SGLang's stats-logging rank) logs and exports, or the fleet
sum would count each compression N times. Under ``--dp-size N`` every replica exports its
own series, labelled ``dp_rank``; ``sum()`` over them is the server's total. With DP attention
each DP rank is the first rank of its own attention-TP group, so each exports once.
"""

from kara_patches._patch import Patch
from kara_sglang import adapter
from kara_sglang.dp_rank import dp_rank


def _report(result, reporter, *args, **kwargs):
    runtime = adapter.current()
    if runtime is not None and getattr(reporter, "is_stats_logging_rank", True):
        interval = getattr(reporter, "decode_log_interval", 40) or 40
        runtime.report(getattr(reporter, "forward_ct_decode", 0) % interval == 0,
                       getattr(reporter, "enable_metrics", False),
                       dp_rank=dp_rank(getattr(reporter, "scheduler", None)))
    return result


PATCHES = (Patch("sglang.srt.managers.scheduler_components.metrics_reporter.SchedulerMetricsReporter."
                 "report_decode_stats", "AFTER", _report),)
