"""Ask a running `vllm serve` (examples/serve.sh) through the openai client.

    .venv/bin/python examples/client.py [--base-url http://127.0.0.1:8000/v1]

Prints the answer and vLLM's speculative-decoding counters from /metrics.
"""

import argparse
import json
import urllib.request

from openai import OpenAI

COUNTERS = (
    "vllm:spec_decode_num_drafts_total",
    "vllm:spec_decode_num_draft_tokens_total",
    "vllm:spec_decode_num_accepted_tokens_total",
)


def spec_counters(base_url: str) -> dict[str, float]:
    root = base_url.rstrip("/").removesuffix("/v1")
    text = urllib.request.urlopen(f"{root}/metrics", timeout=30).read().decode()
    out = {name: 0.0 for name in COUNTERS}
    for line in text.splitlines():
        for name in COUNTERS:
            if line.startswith(name + "{") or line.startswith(name + " "):
                out[name] += float(line.rsplit(" ", 1)[1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--prompt", default="Write a Python function that checks if a number is prime.")
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="EMPTY")
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=args.max_tokens,
        temperature=0.0,
    )
    print(reply.choices[0].message.content)
    print(json.dumps({"usage": reply.usage.completion_tokens, **spec_counters(args.base_url)}))


if __name__ == "__main__":
    main()
