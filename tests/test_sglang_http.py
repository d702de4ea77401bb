"""The HTTP server and the command line: flags, start-up errors, /generate, /metrics."""

import json
import os
import re
import sys
import time
import urllib.error
import urllib.request

import pytest

from support import cli as cli_runs
from support.engines import use_cpu_sglang
from support.http_server import CPU_ARGS, SERVER
from support.http_server import get as _get
from support.http_server import serve as _serve

pytestmark = pytest.mark.sglang

use_cpu_sglang()

SERVE = [os.path.join(os.path.dirname(sys.executable), "sglang"), "serve"]


# Each start-up costs 25-45 s of imports on a 2-core CPU: every bad flag goes through
# `python -m sglang.launch_server` on the newest release; `sglang serve` and the oldest release
# get one (below). The selected cases run side by side, once per module (support.cli).
BAD_FLAGS = {
    "keep-ratio": (["--kara-keep-ratio", "2"], "error: --kara-keep-ratio: must be in (0, 1], got 2.0"),
    "buffer": (["--kara-window", "64", "--kara-buffer", "64"],
               "error: --kara-buffer: buffer U=64 must be smaller than window W=64"),
    "mixed-chunk": (["--enable-mixed-chunk"], "error: --kv-policy kara: not supported together with --enable-mixed-chunk"),
    "scope": (["--kara-scope", "reasoning"], "error: --kara-scope: reasoning needs --reasoning-parser"),
    "prefill": (["--disaggregation-mode", "prefill"],
                "error: --kv-policy kara: a prefill server (--disaggregation-mode prefill) never decodes"),
    "decode-radix": (["--disaggregation-mode", "decode", "--disaggregation-decode-enable-radix-cache"],
                     "error: --kv-policy kara: not supported together with --disaggregation-decode-enable-radix-cache"),
}
SERVE_BAD = (["--kara-window", "64", "--kara-buffer", "64"], "error: --kara-buffer: buffer U=64 must be smaller than window W=64")


def _commands(tiny_model) -> dict:
    def bad(command, extra):
        return command + ["--model-path", str(tiny_model), "--kv-policy", "kara"] + CPU_ARGS + extra

    commands = {f"bad:{key}": bad(SERVER, extra) for key, (extra, _) in BAD_FLAGS.items()}
    commands["help"] = SERVER + ["--help"]
    commands["serve"] = bad(SERVE, SERVE_BAD[0])
    commands["unknown"] = SERVER + ["--model-path", str(tiny_model), "--kv-policy", "snapkv"] + CPU_ARGS
    return commands


def _case(item):
    name = item.originalname if hasattr(item, "originalname") else item.name
    if name == "test_bad_flags_stop_the_launch_with_one_line":
        return "bad:" + item.callspec.params["case"]
    return {"test_help_lists_the_policy_flags": "help", "test_sglang_serve_stops_on_a_bad_flag_with_one_line": "serve",
            "test_unknown_policy_is_refused_by_the_parser": "unknown"}.get(name)


@pytest.fixture(scope="module")
def cli(request, tiny_model):
    return cli_runs.run_all(cli_runs.selected_cases(request, _commands(tiny_model), _case))


@pytest.mark.newest_release  # the parser the unknown-policy test below checks on every release
def test_help_lists_the_policy_flags(cli):
    out = cli["help"].stdout
    for flag in ("--kv-policy", "--kara-window", "--kara-buffer", "--kara-keep-ratio", "--kara-budget",
                 "--kara-chunk-size", "--kara-chunk-fraction", "--kara-vote-layers", "--kara-vote-heads"):
        assert flag in out
    assert "{none,kara,streaming,threshold,cask,longflow}" in out


def expect_one_line_error(proc, message):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.newest_release
@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_stop_the_launch_with_one_line(cli, case):
    expect_one_line_error(cli["bad:" + case], BAD_FLAGS[case][1])


def test_sglang_serve_stops_on_a_bad_flag_with_one_line(cli):
    expect_one_line_error(cli["serve"], SERVE_BAD[1])


def test_unknown_policy_is_refused_by_the_parser(cli):
    proc = cli["unknown"]
    assert proc.returncode == 2 and "invalid choice: 'snapkv'" in proc.stderr


def _post(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def kara_server(kara_http_server):
    return kara_http_server


def test_http_generate_compresses_and_reports_it(kara_server):
    base, proc, log = kara_server
    status, out = _post(base + "/generate", {
        "text": "the first step is",
        "sampling_params": {"temperature": 0, "max_new_tokens": 120, "ignore_eos": True}})
    assert status == 200
    assert out["meta_info"]["kv_tokens_evicted"][-1] > 0
    assert out["meta_info"]["kv_tokens_kept"][-1] < out["meta_info"]["prompt_tokens"] + 120


def test_http_bad_request_value_is_a_clean_error_and_serving_goes_on(kara_server):
    base, proc, log = kara_server
    status, out = _post(base + "/generate", {
        "text": "one two three",
        "sampling_params": {"max_new_tokens": 10, "custom_params": {"kara_keep_ratio": -1}}})
    assert status == 400
    assert "--kara-keep-ratio" in json.dumps(out)
    status, out = _post(base + "/generate", {"text": "one two three", "sampling_params": {"max_new_tokens": 10}})
    assert status == 200 and proc.poll() is None


@pytest.mark.parametrize("body, fragment", [
    ({"input_ids": [5, 10 ** 9]}, "outside the model's vocabulary"),
    ({"text": ""}, "no tokens|texts cannot be empty"),  # no BOS; SGLang 0.5.17 refuses empty text itself
    ({"text": "one", "sampling_params": {"custom_params": "kara_keep_ratio=0.5"}}, "must be an object"),
])
def test_http_bad_prompts_that_killed_the_scheduler_are_clean_errors(kara_server, body, fragment):
    # Each of these once ended the server: SGLang (or the plugin) read them unchecked.
    base, proc, log = kara_server
    body = dict(body, sampling_params={"max_new_tokens": 5, **body.get("sampling_params", {})})
    status, out = _post(base + "/generate", body)
    assert status == 400 and re.search(fragment, json.dumps(out)), out
    status, out = _post(base + "/generate", {"text": "one two three", "sampling_params": {"max_new_tokens": 10}})
    assert status == 200 and proc.poll() is None


def test_http_metrics_and_log_line(kara_server):
    base, proc, log = kara_server
    _post(base + "/generate", {"text": "water long little", "sampling_params": {
        "temperature": 0, "max_new_tokens": 100, "ignore_eos": True}})
    metrics = _get(base + "/metrics")
    match = re.search(r"^kara:compression_events_total(?:\{[^}]*\})? ([0-9.e+]+)$", metrics, re.M)
    assert match and float(match.group(1)) > 0, metrics[-2000:]
    assert re.search(r"^kara:tokens_evicted_total(?:\{[^}]*\})? [1-9]", metrics, re.M)
    assert "kara: compressions" in log.read_text()
    info = json.loads(_get(base + "/server_info"))
    state = info["internal_states"][0]["kara"]
    assert state["kv_policy"] == "kara" and state["compression_events"] > 0


def _series(metrics, name):
    """{dp_rank: value} of one kara counter on /metrics."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        rf'^{re.escape(name)}\{{[^}}]*dp_rank="(\d+)"[^}}]*\}} ([0-9.e+]+)$', metrics, re.M)}


@pytest.mark.slow
def test_http_data_parallel_replicas_report_their_own_and_the_sum(tiny_model, tmp_path_factory):
    from support.engines import parallel_env

    server = _serve(tiny_model, tmp_path_factory, ["--dp-size", "2"], env=parallel_env(1, 2))
    base, proc, log = next(server)
    try:
        for text in ("the first step is", "one two three", "water long little", "they were called"):
            status, out = _post(base + "/generate", {"text": text, "sampling_params": {
                "temperature": 0, "max_new_tokens": 100, "ignore_eos": True}})
            assert status == 200 and out["meta_info"]["kv_tokens_evicted"][-1] > 0
        time.sleep(1)  # the last step's counters reach the multiprocess registry
        states = [s["kara"] for s in json.loads(_get(base + "/server_info"))["internal_states"]]
        assert sorted(s["dp_rank"] for s in states) == [0, 1]  # replicas answer in any order
        assert all(s["compression_events"] > 0 for s in states), states  # round robin: both worked
        for _ in range(20):  # exported on SGLang's decode-log cadence
            metrics = _get(base + "/metrics")
            events = _series(metrics, "kara:compression_events_total")
            if events == {str(s["dp_rank"]): float(s["compression_events"]) for s in states}:
                break
            time.sleep(0.5)
        # One series per replica, each equal to that replica's own count: sum() is the server's.
        assert events == {str(s["dp_rank"]): float(s["compression_events"]) for s in states}, metrics[-3000:]
    finally:
        server.close()
