"""Keep chat completions running against the gateway until a stop file appears.

side_effect.yml runs this on the controller while remove_worker.yml drains a worker. CONCURRENCY
clients each send one request after another (POST /v1/chat/completions, greedy) and record when
it started and ended (the controller's clock, which the Molecule hosts share), the HTTP status,
the answer's length and who answered. Once STOP_FILE exists every client finishes the request it
has open and stops (so does --deadline); the records go to OUT as JSON and a summary to stdout.
The gateway URL and the API key come from the client config the ray_head role wrote, so the key
never appears on a command line or in Ansible's output.
"""

from __future__ import annotations

import argparse
import collections
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml  # Ansible's own dependency: present wherever ansible-playbook runs

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a computer does, in three sentences.",
    "Give me three tips for learning to cook.",
    "Describe a sunny day in the park.",
    "Tell me a short story about a cat.",
    "Why is the sky blue?",
]


def ask(url: str, key: str, model: str, prompt: str, max_tokens: int, timeout: float) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{url}/v1/chat/completions", body, headers)
    record: dict = {"prompt": prompt, "start": time.time(), "status": None, "chars": 0, "tokens": 0,
                    "ip": None, "node_label": None, "retries": 0, "error": None}
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            record["status"] = response.status
            answer = json.load(response)
        served = answer.get("rayinfer") or {}
        record.update(chars=len((answer["choices"][0]["message"]["content"] or "").strip()),
                      tokens=answer.get("usage", {}).get("completion_tokens"),
                      ip=served.get("ip"), node_label=served.get("node_label"),
                      retries=served.get("retries", 0))
    except urllib.error.HTTPError as exc:
        record.update(status=exc.code, error=exc.read(300).decode(errors="replace"))
    except Exception as exc:  # a refused or dropped connection is a failed request too
        record["error"] = f"{type(exc).__name__}: {exc}"[:300]
    record["end"] = time.time()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client-config", required=True, help="YAML with url and api_key")
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--deadline", type=float, default=1200.0, help="stop after, seconds")
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    client = yaml.safe_load(Path(args.client_config).read_text())
    url, key = client["url"].rstrip("/"), client.get("api_key") or ""
    stop, deadline = Path(args.stop_file), time.time() + args.deadline
    records: list[dict] = []
    lock = threading.Lock()

    def run(n: int) -> None:
        i = n
        while not stop.exists() and time.time() < deadline:
            record = ask(url, key, args.model, PROMPTS[i % len(PROMPTS)], args.max_tokens,
                         args.timeout)
            record["client"] = n
            with lock:
                records.append(record)
            i += 1

    threads = [threading.Thread(target=run, args=(n,)) for n in range(args.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    records.sort(key=lambda r: r["start"])
    Path(args.out).write_text(json.dumps(records, indent=1))
    failed = [r for r in records if r["status"] != 200 or not r.get("chars")]
    print(json.dumps({"requests": len(records), "failed": len(failed),
                      "by_ip": dict(collections.Counter(r.get("ip") for r in records)),
                      "retried": sum(1 for r in records if r.get("retries"))}))


if __name__ == "__main__":
    main()
