"""Feed the crawler: `python producer.py [REDIS_URL]` puts ip jobs for 10.0.0.0/24 and a few domains.

Any machine that reaches the Redis server can produce; `tprocess enqueue` does the same from a shell:
    cat ips.jsonl | tprocess enqueue --broker redis://127.0.0.1:6379/0 ip
"""

import ipaddress
import sys

from tprocess import Queue

url = sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0"
with Queue(url, "ip") as ips:
    ids = ips.put_many({"ip": str(ip)} for ip in ipaddress.ip_network("10.0.0.0/24").hosts())
    print(f"{len(ids)} ip jobs")
with Queue(url, "domain") as domains:
    ids = domains.put_many({"domain": name} for name in ("example.com", "example.org", "localhost"))
    print(f"{len(ids)} domain jobs")
