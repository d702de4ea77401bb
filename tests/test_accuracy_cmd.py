"""kara-accuracy (kara_sglang.accuracy): layouts, answer extraction, the Wilson interval,
settings, one-line errors, and one run against a real CPU SGLang server with Kara."""

import importlib.metadata
import json
import math
import socket

import pytest

from kara_sglang.accuracy import InputError
from kara_sglang.accuracy.__main__ import build_parser, main
from kara_sglang.accuracy.answers import answers_match, extract_boxed, extract_last_number, make_extractor, normalize
from kara_sglang.accuracy.kv import request_kv
from kara_sglang.accuracy.problems import load_problems
from kara_sglang.accuracy.settings import check_against_server, parse_settings
from kara_sglang.accuracy.stats import wilson_interval


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ------------------------------------------------------------------ problems

def test_math500_layout(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [
        {"problem": "1+1?", "solution": "...", "answer": "2", "subject": "x", "level": 1},
        {"problem": "half?", "answer": "\\frac{1}{2}"}])
    for layout in ("auto", "math500"):
        problems = load_problems(path, layout)
        assert [(p.question, p.reference, p.line) for p in problems] == [("1+1?", "2", 1), ("half?", "\\frac{1}{2}", 2)]


def test_aime_layouts_question_or_capitalised_problem_and_int_answers(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [{"question": "q1", "answer": 204}])
    assert [(p.question, p.reference) for p in load_problems(path, "aime")] == [("q1", "204")]
    assert load_problems(path)[0].reference == "204"  # auto
    path = _jsonl(tmp_path / "a24.jsonl", [{"ID": "2024-I-1", "Problem": "q", "Solution": "s", "Answer": 33}])
    assert [(p.question, p.reference) for p in load_problems(path, "aime")] == [("q", "33")]


def test_gsm8k_reference_is_after_the_marks(tmp_path):
    path = _jsonl(tmp_path / "g.jsonl", [
        {"question": "How many?", "answer": "She has 3+4=<<3+4=7>>7.\n#### 1,007"}])
    for layout in ("auto", "gsm8k"):
        assert [(p.question, p.reference) for p in load_problems(path, layout)] == [("How many?", "1,007")]


def test_custom_fields_and_limit_and_blank_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "a", "target": "x"}\n\n{"prompt": "b", "target": "y"}\n{"prompt": "c", "target": "z"}\n')
    problems = load_problems(path, question_field="prompt", answer_field="target", limit=2)
    assert [(p.question, p.reference, p.line) for p in problems] == [("a", "x", 1), ("b", "y", 3)]
    path = _jsonl(tmp_path / "one.jsonl", [{"prompt": "a", "answer": 3}])  # one field named
    assert [(p.question, p.reference) for p in load_problems(path, question_field="prompt")] == [("a", "3")]


@pytest.mark.parametrize("content, layout, message", [
    (None, "auto", "cannot read the file"),
    ("", "auto", "no problems (the file is empty)"),
    ('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": \n', "auto", "line 2: not valid JSON"),
    ('{"problem": "a", "answer": "1"}\n[1, 2]\n', "auto", "line 2: expected a JSON object"),
    ('{"problem": "a", "answer": "1"}\n{"problem": "b"}\n', "math500", "line 2: no field 'answer' (has: problem)"),
    ('{"problem": "a", "answer": null}\n', "auto", "line 1: field 'answer' is null"),
    ('{"question": "a", "answer": "no marks"}\n', "gsm8k", "line 1: gsm8k answer has no '#### <answer>'"),
    ('{"text": "a"}\n', "auto", "line 1: cannot tell the layout from fields text"),
])
def test_bad_files_raise_one_line(tmp_path, content, layout, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError) as err:
        load_problems(path, layout)
    assert message in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------ answers

def test_boxed_takes_the_last_box_with_nested_braces():
    text = "first \\boxed{1} then \\boxed{\\frac{1}{\\sqrt{2}}} done."
    assert extract_boxed(text) == "\\frac{1}{\\sqrt{2}}"
    assert extract_boxed("\\fbox{7}") == "7"
    assert extract_boxed("so \\boxed 5") == "5"
    assert extract_boxed("\\boxed{3} and a cut-off \\boxed{\\frac{1}") == "3"  # unclosed: the one before
    assert extract_boxed("no box") is None


def test_last_number_strips_commas_and_sentence_dots():
    assert extract_last_number("3 apples, then 1,234.5 and finally 42.") == "42"
    assert extract_last_number("total: 1,000,000") == "1000000"
    assert extract_last_number("it was -3.25") == "-3.25"
    assert extract_last_number("none here") is None


def test_regex_takes_the_first_group_of_the_last_match():
    extract = make_extractor(r"regex:[Aa]nswer: *(\w+)")
    assert extract("Answer: B ... wait, answer: C") == "C"
    assert make_extractor("regex:\\d+")("a 1 b 22") == "22"  # no group: the whole match
    assert extract("nothing") is None
    with pytest.raises(InputError, match="bad regular expression"):
        make_extractor("regex:(")
    with pytest.raises(InputError, match="unknown mode"):
        make_extractor("first-number")


@pytest.mark.parametrize("predicted, reference", [
    ("42.0", "42"), ("1,000", "1000"), ("$5$.", "5"), ("\\text{(A)}", "(A)"),
    ("\\left( 1, 2 \\right)", "(1,2)"), ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("\\frac{1}{2}", "0.5"),
    ("3/4", "0.75"), ("90^\\circ", "90"), (" x + 1 ", "x+1"),
])
def test_equal_answers_match(predicted, reference):
    assert answers_match(predicted, reference)


@pytest.mark.parametrize("predicted, reference", [("41", "42"), ("(1,2)", "(2,1)"), (None, "1"), ("1,2", "12")])
def test_different_answers_do_not(predicted, reference):
    assert not answers_match(predicted, reference)


def test_normalize():
    assert normalize("  \\text{ 10 } . ") == "10"
    assert normalize("\\left[ a \\right]") == "[a]"


# ------------------------------------------------------------------ statistics, KV, settings

def _wilson_by_hand(k, n, z=1.959963984540054):
    # The interval's definition: the p whose score test |k/n - p| <= z sqrt(p(1-p)/n) is
    # tight, i.e. the roots of (1 + z²/n) p² - (2k/n + z²/n) p + (k/n)² = 0.
    a, b, c = 1 + z * z / n, -(2 * k / n + z * z / n), (k / n) ** 2
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize("k, n", [(45, 50), (1, 30), (250, 500), (3, 7)])
def test_wilson_interval(k, n):
    low, high = wilson_interval(k, n)
    want_low, want_high = _wilson_by_hand(k, n)
    assert low == pytest.approx(want_low, abs=1e-12) and high == pytest.approx(want_high, abs=1e-12)


def test_wilson_known_values_and_edges():
    low, high = wilson_interval(45, 50)
    assert round(low, 3) == 0.786 and round(high, 3) == 0.957
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_request_kv():
    # prompt 4; 4 outputs; the last two steps evicted 2 tokens
    kv = request_kv({"prompt_tokens": 4, "kv_tokens_kept": [5, 6, 5, 6], "kv_tokens_evicted": [0, 0, 2, 2]})
    assert kv.fraction == pytest.approx((1 + 2 + 1 + 2) / (1 + 2 + 3 + 4))
    assert kv.mean_tokens == pytest.approx(1.5) and kv.final_kept == 2 and kv.final_evicted == 2
    assert request_kv({"prompt_tokens": 4, "kv_tokens_kept": [4, 5, 6], "kv_tokens_evicted": [0, 0, 0]}).fraction == 1.0
    assert request_kv({"prompt_tokens": 4, "completion_tokens": 3}) is None  # no plugin


def test_settings_parse_to_custom_params():
    settings = parse_settings("vanilla; server ;kara:keep=0.5;kara:keep=0.25,chunk=1;kara:budget=128;"
                              "threshold:budget=64,chunk_fraction=0.25")
    assert [(s.label, s.custom_params) for s in settings] == [
        ("vanilla", {"kv_policy": "none"}), ("server", None),
        ("kara:keep=0.5", {"kara_keep_ratio": 0.5}),
        ("kara:keep=0.25,chunk=1", {"kara_keep_ratio": 0.25, "kara_chunk_size": 1}),
        ("kara:budget=128", {"kara_budget": 128}),
        ("threshold:budget=64,chunk_fraction=0.25", {"kara_budget": 64, "kara_chunk_fraction": 0.25})]
    check_against_server(settings, "threshold")  # kara is the generic label: fine
    with pytest.raises(InputError, match="the server runs --kv-policy kara"):
        check_against_server(settings, "kara")


@pytest.mark.parametrize("text, message", [
    ("kara:window=64", "unknown key 'window'"), ("kara:keep=half", "keep=half is not a number"),
    ("kara:budget=1.5", "budget=1.5 is not an integer"), ("kara", "at least one key=value"),
    ("kara:keep", "keep needs a value"), (";", "no settings given"),
])
def test_bad_settings_are_one_clear_error(text, message):
    with pytest.raises(InputError, match=message):
        parse_settings(text)


# ------------------------------------------------------------------ the command's errors

def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: nothing listens there


def test_unreachable_server_is_one_line_and_exit_2(tmp_path, capsys):
    data = _jsonl(tmp_path / "p.jsonl", [{"problem": "1+1", "answer": "2"}])
    code = main(["--url", f"http://127.0.0.1:{_closed_port()}", "--data", str(data), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("kara-accuracy: error: cannot reach the server at http://127.0.0.1:")


@pytest.mark.parametrize("content, extra, message", [
    (None, [], "cannot read the file"),
    ('{"problem": "a"', [], "line 1: not valid JSON"),
    ('{"problem": "a", "answer": "1"}\n{"problem": "b"}\n', ["--layout", "math500"], "line 2: no field 'answer'"),
    ("", [], "no problems"),
    ('{"problem": "a", "answer": "1"}\n', ["--settings", "kara:window=64"], "unknown key 'window'"),
    ('{"problem": "a", "answer": "1"}\n', ["--prompt-template", "Q: {q}"], "must contain {question}"),
    ('{"problem": "a", "answer": "1"}\n', ["--sampling-params", "{bad"], "--sampling-params: not valid JSON"),
])
def test_bad_inputs_exit_2_with_one_line_before_any_request(tmp_path, capsys, content, extra, message):
    data = tmp_path / "p.jsonl"
    if content is not None:
        data.write_text(content)
    # A closed port: the input is checked before the server is, so the message is the input's.
    code = main(["--url", f"http://127.0.0.1:{_closed_port()}", "--data", str(data), "--no-progress"] + extra)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.sglang  # transformers and tokenizers come with the [sglang] extra
def test_prompt_template_and_client_side_chat_template(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from kara_sglang.accuracy.prompts import make_prompt_builder

    assert make_prompt_builder("Q: {question} in \\boxed{}", None)("1+1") == {"text": "Q: 1+1 in \\boxed{}"}
    with pytest.raises(InputError, match="has no chat template"):
        make_prompt_builder("{question}", str(tiny_model))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = "{% for m in messages %}user: {{ m.content }}{% endfor %} answer:"
    tokenizer.save_pretrained(tmp_path / "chat")
    ids = make_prompt_builder("{question} step", str(tmp_path / "chat"))("one two")["input_ids"]
    assert tokenizer.decode(ids) == "user: one two step answer:"


class _FakeServer:
    """A stand-in SGLang without the plugin: answers \\boxed{4}, no KV lists; a prompt with
    'fail' gets an HTTP 400. Records the requests it saw."""

    def __init__(self, policy=None):
        import http.server
        import threading

        seen = self.requests = []
        release = self.release = threading.Event()  # a prompt with "hang" waits for it

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/get_model_info":
                    self._json(200, {"model_path": "fake-model"})
                elif self.path == "/server_info" and policy:
                    self._json(200, {"internal_states": [{"kara": {"kv_policy": policy}}]})
                else:
                    self._json(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                seen.append(body)
                if "hang" in body["text"]:
                    release.wait(60)
                if "fail" in body["text"]:
                    self._json(400, {"error": {"message": "kara_keep_ratio: must be in (0, 1]"}})
                else:
                    self._json(200, {"text": "so \\boxed{4}.", "meta_info": {"prompt_tokens": 3, "completion_tokens": 5}})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server():
    server = _FakeServer()
    yield server
    server.close()


def test_failed_requests_count_as_errors_and_no_kv_lists_read_na(fake_server, tmp_path, capsys):
    data = _jsonl(tmp_path / "p.jsonl", [{"problem": "2+2", "answer": "4"}, {"problem": "fail 2+3", "answer": "5"},
                                         {"problem": "2*2", "answer": "4.0"}])
    out = tmp_path / "out.json"
    assert main(["--url", fake_server.url + "/", "--data", str(data), "--settings", "vanilla;server;kara:keep=0.5",
                 "--stop", "</s>", "--sampling-params", '{"top_p": 0.9}', "--max-new-tokens", "7",
                 "--no-progress", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    table = captured.out
    assert captured.err.count("1 of 3 requests failed") == 3, captured.err
    rows = json.loads(out.read_text())["rows"]
    assert json.loads(out.read_text())["model"] == "fake-model"
    for row in rows:
        assert (row["n"], row["correct"], row["errors"]) == (3, 2, 1)
        assert row["first_error"] == "HTTP 400: kara_keep_ratio: must be in (0, 1]"
        assert row["kv_mean_fraction"] is None and row["kv_mean_tokens"] is None and row["kv_measured"] == 0
        assert row["output_tokens_mean"] == 5
    assert "KV n/a" in table and "vanilla: 1 failed, first: HTTP 400" in table
    # What went out: greedy + the flags, custom_params per setting (none for 'server').
    params = [r["sampling_params"] for r in fake_server.requests]
    assert all(p["temperature"] == 0 and p["max_new_tokens"] == 7 and p["stop"] == ["</s>"] and p["top_p"] == 0.9
               for p in params)
    assert [p.get("custom_params") for p in params[::3]] == [{"kv_policy": "none"}, None, {"kara_keep_ratio": 0.5}]


def test_records_are_written_as_replies_arrive_not_when_the_setting_ends(fake_server, tmp_path):
    """A run cut short (a GPU lease ending) keeps the requests it finished."""
    import threading
    import time

    data = _jsonl(tmp_path / "p.jsonl", [{"problem": "2+2", "answer": "4"}, {"problem": "hang 1+1", "answer": "2"},
                                         {"problem": "2*2", "answer": "5"}])
    records = tmp_path / "records.jsonl"
    status = {}
    run = threading.Thread(target=lambda: status.update(rc=main([
        "--url", fake_server.url, "--data", str(data), "--settings", "vanilla", "--concurrency", "3",
        "--no-progress", "--records", str(records)])))
    run.start()
    deadline = time.time() + 60
    while time.time() < deadline and not (records.exists() and len(records.read_text().splitlines()) == 2):
        time.sleep(0.05)
    early = [json.loads(line) for line in records.read_text().splitlines()]
    assert run.is_alive()  # the hanging request is still out
    fake_server.release.set()
    run.join(60)
    assert status["rc"] == 0
    assert sorted((r["line"], r["correct"]) for r in early) == [(1, True), (3, False)]
    final = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["line"] for r in final[:2]] == [r["line"] for r in early] and final[2]["line"] == 2


def test_exit_status_0_when_every_request_is_answered_1_when_any_failed(fake_server, tmp_path, capsys):
    ok = _jsonl(tmp_path / "ok.jsonl", [{"problem": "2+2", "answer": "4"}, {"problem": "2*3", "answer": "7"}])
    assert main(["--url", fake_server.url, "--data", str(ok), "--settings", "vanilla", "--no-progress"]) == 0
    assert "failed" not in capsys.readouterr().err  # a wrong answer is not a failure
    bad = _jsonl(tmp_path / "bad.jsonl", [{"problem": "fail", "answer": "4"}, {"problem": "fail too", "answer": "6"}])
    out = tmp_path / "out.json"
    assert main(["--url", fake_server.url, "--data", str(bad), "--settings", "vanilla;server", "--no-progress",
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "vanilla: 2 of 2 requests failed" in err and "server: 2 of 2 requests failed" in err
    assert len(json.loads(out.read_text())["rows"]) == 2  # the rows are still written
    assert "some requests failed" in build_parser().format_help()


@pytest.mark.parametrize("policy, settings, message", [
    ("kara", "threshold:budget=64", "the server runs --kv-policy kara"),
    ("none", "kara:keep=0.5", "the server runs --kv-policy none"),
])
def test_settings_that_do_not_fit_the_server_stop_before_any_request(tmp_path, capsys, policy, settings, message):
    server = _FakeServer(policy)
    try:
        data = _jsonl(tmp_path / "p.jsonl", [{"problem": "2+2", "answer": "4"}])
        assert main(["--url", server.url, "--data", str(data), "--settings", settings, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and not server.requests
    finally:
        server.close()


# ------------------------------------------------------------------ end to end, real SGLang

PROMPTS = ["the first step is", "one two three", "water long little", "they were called",
           "zero plus one equals", "what is the answer"]


@pytest.fixture(scope="module")
def accuracy_server(kara_http_server):
    return kara_http_server  # --kv-policy kara, W = 32, U = 8 (tests/conftest.py)


@pytest.mark.sglang
@pytest.mark.newest_release  # a client of the server
def test_end_to_end_vanilla_is_exact_and_kara_keeps_less(accuracy_server, tmp_path, capsys):
    base, proc, log = accuracy_server
    # One batch per setting (concurrency = problems) keeps the CPU run short.
    common = ["--url", base, "--max-new-tokens", "120", "--concurrency", str(len(PROMPTS)), "--no-progress",
              # ignore_eos: every output is 120 tokens long, so Kara (window 32) compresses
              "--sampling-params", '{"ignore_eos": true}', "--extract", r"regex:(\S+)\s*$"]
    # 1. References: the vanilla (opted-out, full KV) outputs' last word, through the command.
    first = _jsonl(tmp_path / "prompts.jsonl", [{"question": p, "answer": "?"} for p in PROMPTS])
    first_records = tmp_path / "first.jsonl"
    assert main(common + ["--data", str(first), "--layout", "aime", "--settings", "vanilla",
                          "--records", str(first_records)]) == 0
    # Records come in the order requests finish; each names its problem.
    references = sorted((json.loads(line) for line in first_records.read_text().splitlines()),
                        key=lambda r: r["index"])
    assert all(r["extracted"] and r["error"] is None for r in references), references
    data = _jsonl(tmp_path / "problems.jsonl",
                  [{"problem": p, "answer": r["extracted"]} for p, r in zip(PROMPTS, references)])
    capsys.readouterr()

    # 2. The run: vanilla must reproduce itself (greedy), Kara must keep less.
    out, records = tmp_path / "results.json", tmp_path / "records.jsonl"
    assert main(common + ["--data", str(data), "--settings", "vanilla;kara:keep=0.5;kara:keep=0.25",
                          "--out", str(out), "--records", str(records)]) == 0
    captured = capsys.readouterr()
    table = captured.out
    assert "kv_policy kara" in captured.err  # read from /server_info
    result = json.loads(out.read_text())
    assert set(result) == {"server", "model", "data", "sglang_version", "kara_config", "rows"}
    # What ran, from the server itself (report.py reads these instead of restating them).
    assert result["sglang_version"] == importlib.metadata.version("sglang")
    assert (result["kara_config"]["window"], result["kara_config"]["buffer"]) == (32, 8)
    assert result["server"] == base and result["model"] == str(accuracy_server_model(base)) and result["data"] == str(data)
    rows = {row["setting"]: row for row in result["rows"]}
    assert list(rows) == ["vanilla", "kara:keep=0.5", "kara:keep=0.25"]
    for row in rows.values():
        assert set(row) >= {"setting", "custom_params", "n", "correct", "accuracy", "ci95", "kv_mean_fraction",
                            "kv_mean_tokens", "output_tokens_mean", "output_tokens_per_s", "errors"}
        assert row["n"] == len(PROMPTS) and row["errors"] == 0 and row["kv_measured"] == len(PROMPTS)
        assert 0 <= row["correct"] <= row["n"] and row["accuracy"] == row["correct"] / row["n"]
        assert row["ci95"] == list(wilson_interval(row["correct"], row["n"]))
        assert row["output_tokens_mean"] == 120 and row["output_tokens_per_s"] > 0
        assert row["setting"] in table
    vanilla, half, quarter = rows["vanilla"], rows["kara:keep=0.5"], rows["kara:keep=0.25"]
    assert vanilla["correct"] == len(PROMPTS) and vanilla["accuracy"] == 1.0
    assert vanilla["kv_mean_fraction"] == 1.0
    assert quarter["kv_mean_fraction"] < half["kv_mean_fraction"] < 1.0
    assert quarter["kv_mean_tokens"] < half["kv_mean_tokens"] < vanilla["kv_mean_tokens"]

    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(lines) == 3 * len(PROMPTS)
    assert sum(r["correct"] for r in lines if r["setting"] == "kara:keep=0.25") == quarter["correct"]
    assert all(r["kv_final_evicted"] > 0 for r in lines if r["setting"] != "vanilla")
    assert all(r["kv_final_evicted"] == 0 for r in lines if r["setting"] == "vanilla")

    # 3. A value the server refuses: every request fails with its 400, counted, not a crash.
    # A script or CI job running it sees the failure: exit status 1.
    assert main(common + ["--data", str(data), "--settings", "kara:keep=2", "--limit", "2", "--out", str(out)]) == 1
    row = json.loads(out.read_text())["rows"][0]
    assert (row["n"], row["correct"], row["errors"]) == (2, 0, 2)
    assert row["first_error"].startswith("HTTP 400") and "--kara-keep-ratio" in row["first_error"], row
    assert proc.poll() is None


def accuracy_server_model(base):
    import urllib.request

    with urllib.request.urlopen(base + "/get_model_info", timeout=30) as resp:
        return json.loads(resp.read())["model_path"]
