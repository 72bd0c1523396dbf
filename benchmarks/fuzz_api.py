"""Fuzz the OpenAI-compatible API with schemathesis against its own /openapi.json.

    python benchmarks/fuzz_api.py [--max-examples 100]

Starts `nanoseek serve` in-process on loopback (a random test-size model, an API key), runs schemathesis
with checks for server errors (5xx) and conformance of status codes, content types and response bodies
to the schema, and prints how many cases it tried and what failed.
"""

import argparse
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from load_test import start  # noqa: E402

from nanoseek.engine import Engine  # noqa: E402
from nanoseek.model import DeepSeekV3, config_for_size  # noqa: E402
from nanoseek.server import create_app  # noqa: E402
from nanoseek.tokenizer import train_tokenizer  # noqa: E402

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max-examples", type=int, default=100, help="cases per operation and phase")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    tok = train_tokenizer([f"{a} + {b} = {a + b}" for a in range(100) for b in range(30)], 400)
    model = DeepSeekV3(config_for_size(2, vocab_size=448)).init_weights(0)
    url, server = start(create_app(Engine(model, tok, max_batch=8, max_len=128), "fuzz", api_key="fuzz-key",
                                   max_body_bytes=64_000))
    st = os.path.join(os.path.dirname(sys.executable), "st")
    cmd = [st if os.path.exists(st) else "st", "run", f"{url}/openapi.json", "-H", "Authorization: Bearer fuzz-key",
           "--checks", CHECKS,
           "--max-examples", str(args.max_examples), "--seed", str(args.seed), "--no-color",
           "--request-timeout", "60", "--suppress-health-check", "all"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    print(result.stdout[-6000:])
    cases = re.findall(r"(\d+) generated", result.stdout)
    print(f"fuzz: schemathesis exit code {result.returncode}; cases: {', '.join(cases) or 'see above'}")
    server.should_exit = True
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
