"""Alice sends Bob a first message through a running Allspark node.

    ./dev serve &                      # a node on 127.0.0.1:8080
    .venv/bin/python examples/first_message.py [http://127.0.0.1:8080]

Auth keys are normally minted by your app's backend after its own login; here
we mint them with the node's secret (ALLSPARK_AUTH_SECRET, or the file that
``./dev serve`` created in data/auth-secret).
"""

import os
import sys

from twisted.internet import defer, task

from allspark.auth import load_secrets, mint_auth_key
from allspark.client import connect


async def main(reactor, base_url: str) -> None:
    secret_file = None if os.environ.get("ALLSPARK_AUTH_SECRET") else "data/auth-secret"
    secret = load_secrets(os.environ, secret_file)[0]
    alice = await connect(base_url, mint_auth_key(secret, "alice-laptop", "alice"), reactor)
    bob = await connect(base_url, mint_auth_key(secret, "bob-phone", "bob"), reactor)
    accepted = await alice.send(dest_id="bob-phone", payload={"text": "hello Bob"})
    message = await bob.next_message()
    print("alice got:", accepted)
    print("bob got:  ", message)
    await alice.close()
    await bob.close()


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, url)))
