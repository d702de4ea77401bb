"""A multi-turn agent in SGLang's frontend language, served by a Kara server.

Each turn the agent thinks at length (the long generation Kara compresses), weighs two
options in parallel (``fork`` / ``join``), picks a tool with ``sgl.select`` and reads the
tool's output into the conversation; the next turn continues the same program state. Kara needs
nothing from the program: the server compresses each generation's decode tail.

    python -m sglang.launch_server --model-path M --kv-policy kara --port 30000 &
    python examples/agent_frontend.py --url http://127.0.0.1:30000 [--turns 3 --think-tokens 512]

It prints each turn's thinking length, the options' verdicts and the tool chosen, then the
server's compression counters (``/server_info``). On a 2-core CPU against the tiny test model
(``tests/test_examples.py``, 3 turns of 120 thinking tokens, W = 32) the whole test, the
server's start included, took 45 s; the tiny model writes random tokens, so only the
program's structure means anything there.
"""

from __future__ import annotations

import argparse
import json
import urllib.request

import sglang as sgl

TOOLS = ["search", "calculator", "finish"]


@sgl.function
def agent(s, task: str, turns: int, think_tokens: int):
    s += sgl.system("You are an agent. Think step by step, then choose a tool.")
    s += sgl.user(task)
    for turn in range(turns):
        s += sgl.assistant(sgl.gen(f"think_{turn}", max_tokens=think_tokens, temperature=0))
        options = s.fork(2)
        for i, branch in enumerate(options):
            branch += sgl.user(f"Consider option {i + 1}: is it worth doing next? Answer briefly.")
            branch += sgl.assistant(sgl.gen("verdict", max_tokens=16, temperature=0))
        options.join()
        s += sgl.user("Which tool now?")
        s += sgl.assistant(sgl.select(f"tool_{turn}", choices=TOOLS))
        s += sgl.user(f"Tool output for turn {turn + 1}: 42.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True, help="a running SGLang server (with --kv-policy kara)")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--think-tokens", type=int, default=512)
    ap.add_argument("--task", default="Plan a three-step calculation and carry it out.")
    a = ap.parse_args()

    sgl.set_default_backend(sgl.RuntimeEndpoint(a.url))
    state = agent.run(task=a.task, turns=a.turns, think_tokens=a.think_tokens)
    for turn in range(a.turns):
        meta = state.get_meta_info(f"think_{turn}") or {}
        print(f"turn {turn + 1}: thought {meta.get('completion_tokens', '?')} tokens "
              f"(KV evicted: {(meta.get('kv_tokens_evicted') or [0])[-1]}), tool = {state[f'tool_{turn}']}")
    with urllib.request.urlopen(a.url + "/server_info", timeout=30) as resp:
        info = json.loads(resp.read())
    kara = [s.get("kara", {}) for s in info.get("internal_states", [])]
    print("server:", json.dumps({k: sum(s.get(k, 0) for s in kara)
                                 for k in ("compression_events", "tokens_evicted")}))


if __name__ == "__main__":
    main()
