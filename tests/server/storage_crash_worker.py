"""Run by test_storage.py's crash test: append in a loop from several concurrent writers and
print one line per acknowledged message ("ack SEQ CLIENT_ID"), until SIGKILLed.

usage: python storage_crash_worker.py URL OPTIONS_JSON CONVERSATION_ID WRITERS
"""
import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from server.storage import open_storage  # noqa: E402


async def main() -> None:
    url, options, conversation_id, writers = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    storage = await open_storage(url, **options)
    out = sys.stdout
    out.write("ready\n")
    out.flush()

    async def writer(w: int) -> None:
        i = 0
        while True:
            cid = f"w{w}-{i}"
            msg, _ = await storage.append(conversation_id, role="visitor", sender_id="v",
                                          text=f"message {cid}", client_id=cid)
            # Printed only after append() returned, i.e. after the commit: an "ack".
            out.write(f"ack {msg.seq} {cid}\n")
            out.flush()
            i += 1

    await asyncio.gather(*(writer(w) for w in range(writers)))


asyncio.run(main())
