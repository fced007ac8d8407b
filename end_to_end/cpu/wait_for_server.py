"""`python3 end_to_end/cpu/wait_for_server.py PORT PID`: waits until MaxText.serve on 127.0.0.1:PORT answers /health.

Exits non-zero as soon as the server process PID has died, or after 600 s.
"""

import os
import sys
import time
import urllib.request


def main(port: str, pid: int):
  deadline = time.monotonic() + 600
  while True:
    try:
      urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
      return
    except OSError:
      os.kill(pid, 0)  # raises once the server has died
      if time.monotonic() > deadline:
        sys.exit("FAIL: the server did not come up in 600 s")
      time.sleep(1)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
