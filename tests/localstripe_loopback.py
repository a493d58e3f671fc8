"""localstripe on 127.0.0.1 only, its store in a folder of the test's (the upstream command
listens on every interface and shares one fixed file in /tmp). Run: python this.py PORT DIR"""

import os
import pickle
import sys

from aiohttp import web

import localstripe.resources as resources
from localstripe import server

STORE = os.path.join(sys.argv[2], "localstripe.pickle")


def _dump(self):
    with open(STORE, "wb") as handle:
        pickle.dump(self, handle, protocol=pickle.HIGHEST_PROTOCOL)


resources.Store.dump_to_disk = _dump
resources.Store.try_load_from_disk = lambda self: None

if __name__ == "__main__":
    web.run_app(server.app, host="127.0.0.1", port=int(sys.argv[1]), print=lambda *a: None)
