"""``kara-accuracy``: task accuracy of a running SGLang server, per KV policy setting.

An HTTP client only (standard library): it reads a JSONL of problems with reference answers,
sends them to ``{url}/generate`` once per setting (vanilla through the per-request opt-out,
Kara at several keep ratios through ``custom_params``), and reports accuracy with a Wilson
interval, the decode KV each setting kept, and output throughput.

    python -m kara_sglang.accuracy --url http://127.0.0.1:30000 --data math500.jsonl \\
        --extract boxed --settings "vanilla;kara:keep=0.5;kara:keep=0.25"

Modules: ``problems`` (JSONL layouts -> problems), ``answers`` (output -> answer, comparison),
``settings`` (``--settings`` -> per-request ``custom_params``), ``client`` (HTTP),
``kv`` (``meta_info`` -> KV kept), ``stats`` (Wilson interval), ``report`` (rows, table, JSON),
``__main__`` (the command).
"""

class InputError(Exception):
    """A problem the user must fix (file, flag, server address); its message is one line."""
