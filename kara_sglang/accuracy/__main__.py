"""The ``kara-accuracy`` command (``python -m kara_sglang.accuracy``); ``--help`` has the flags."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Optional

from kara_sglang.accuracy import InputError
from kara_sglang.accuracy.answers import make_extractor
from kara_sglang.accuracy.client import generate_all, probe_server
from kara_sglang.accuracy.problems import LAYOUT_CHOICES, load_problems
from kara_sglang.accuracy.progress import Progress
from kara_sglang.accuracy.prompts import make_prompt_builder
from kara_sglang.accuracy.report import format_table, record, score, summarize, write_results
from kara_sglang.accuracy.settings import check_against_server, parse_settings

EXIT_FAILED = 1  # some requests failed (counted as wrong): the rows are printed and written anyway
EXIT_INPUT = 2  # bad file, flag or server address: one line on stderr

EXIT_HELP = """\
exit status:
  0    every request of every setting was answered (right or wrong)
  1    some requests failed (an HTTP error such as the server's 400 for a bad
       per-request value, a timeout, a dropped connection): they count as wrong,
       the table, --out and --records are still written, and one line on stderr
       names each setting with failures
  2    bad file, flag or server address, or settings the server cannot run:
       one line on stderr, before any request
  130  interrupted"""

SETTINGS_HELP = """\
';'-separated settings, run one after another (default: vanilla;server).
vanilla = custom_params {"kv_policy": "none"} (the per-request opt-out: full KV);
server = no custom_params (the server's own --kv-policy/--kara-* flags);
NAME:key=value,... = the server's policy with per-request overrides, keys
keep (kara_keep_ratio), budget (kara_budget), chunk (kara_chunk_size),
chunk_fraction (kara_chunk_fraction). NAME is only a label: a request cannot
switch policy, so NAME must be the server's --kv-policy or 'kara'.
Example: "vanilla;kara:keep=0.5;kara:keep=0.25,chunk=1;kara:budget=128"."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kara-accuracy", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_HELP,
        description="Accuracy of a running SGLang server on a JSONL of problems, per KV setting: "
                    "accuracy with a Wilson 95% interval, mean decode KV kept, output throughput.")
    ap.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:30000")
    ap.add_argument("--data", required=True, help="JSONL file of problems with reference answers")
    ap.add_argument("--layout", default="auto", choices=LAYOUT_CHOICES,
                    help="math500: problem/answer; aime: problem or question/answer (int answers too); "
                         "gsm8k: question/answer after '####'; auto (default): from the first record")
    ap.add_argument("--question-field", help="field holding the question (overrides the layout's)")
    ap.add_argument("--answer-field", help="field holding the reference answer (overrides the layout's)")
    ap.add_argument("--extract", default="boxed",
                    help="boxed (default: last \\boxed{}), last-number, or regex:PATTERN (first group of "
                         "the last match)")
    ap.add_argument("--settings", default="vanilla;server", help=SETTINGS_HELP)
    ap.add_argument("--max-new-tokens", type=_positive_int, default=2048)
    ap.add_argument("--concurrency", type=_positive_int, default=8, help="requests in flight (default 8)")
    ap.add_argument("--limit", type=_positive_int, help="only the first N problems")
    ap.add_argument("--prompt-template", default="{question}",
                    help="prompt text; {question} is replaced, other braces are literal (default: {question})")
    ap.add_argument("--chat-template-from", metavar="TOKENIZER_PATH",
                    help="apply this tokenizer's chat template client-side (needs transformers)")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--sampling-params", default="{}",
                    help='JSON merged into sampling_params (default greedy: {"temperature": 0})')
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per request (default 3600)")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--records", help="write one JSON line per (setting, problem) here, as each "
                    "request finishes (its problem's index and line in the record)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return ap


def _base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


def _sampling_params(args: argparse.Namespace) -> Dict[str, Any]:
    try:
        extra = json.loads(args.sampling_params)
    except ValueError as err:
        raise InputError(f"--sampling-params: not valid JSON ({err})") from None
    if not isinstance(extra, dict):
        raise InputError("--sampling-params: must be a JSON object")
    params: Dict[str, Any] = {"temperature": 0, "max_new_tokens": args.max_new_tokens}
    if args.stop:
        params["stop"] = list(args.stop)
    params.update(extra)
    return params


def run(args: argparse.Namespace) -> int:
    settings = parse_settings(args.settings)
    extractor = make_extractor(args.extract)
    sampling = _sampling_params(args)
    problems = load_problems(args.data, args.layout, args.question_field, args.answer_field, args.limit)
    build_prompt = make_prompt_builder(args.prompt_template, args.chat_template_from)
    prompts = [build_prompt(p.question) for p in problems]
    url = _base_url(args.url)
    server = probe_server(url)
    check_against_server(settings, server.kv_policy)

    print(f"server {url} ({server.model or 'model unknown'}, kv_policy "
          f"{server.kv_policy or 'unknown'}); {len(problems)} problems from {args.data}", file=sys.stderr)
    records = open(args.records, "w", encoding="utf-8") if args.records else None
    rows: List[Dict[str, Any]] = []
    try:
        for setting in settings:
            params = dict(sampling)
            if setting.custom_params is not None:
                params["custom_params"] = dict(setting.custom_params)
            payloads = [dict(prompt, sampling_params=params) for prompt in prompts]
            progress = Progress(len(payloads), setting.label, enabled=not args.no_progress)
            outcomes: List[Any] = [None] * len(payloads)

            def done(i: int, reply: Any) -> None:
                # Each record is written as its reply arrives: a run cut short keeps every
                # request it finished (in completion order; records carry the problem index).
                outcomes[i] = score(problems[i], reply, extractor)
                if records:
                    records.write(json.dumps(record(setting, outcomes[i])) + "\n")
                    records.flush()
                progress.step()

            start = time.perf_counter()
            generate_all(url, payloads, args.concurrency, args.timeout, done)
            wall = time.perf_counter() - start
            progress.close()
            rows.append(summarize(setting, outcomes, wall))
            if args.out:  # after every setting: a long run keeps what it finished
                write_results(args.out, url, server.model, str(args.data), rows,
                              server.sglang_version, server.kara_config)
    finally:
        if records:
            records.close()
    print(format_table(rows))
    failed = [r for r in rows if r["errors"]]
    for r in failed:
        print(f"kara-accuracy: {r['setting']}: {r['errors']} of {r['n']} requests failed "
              f"(first: {r['first_error']})", file=sys.stderr)
    return EXIT_FAILED if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except InputError as err:
        print(f"kara-accuracy: error: {err}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("kara-accuracy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
