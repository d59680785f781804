"""One Conduit call with the phabricator package, unchanged from PyPI, configured with only
the API URL and a token: ``python call_phabricator.py API_URL METHOD PARAMS_JSON`` with the
token in CONDUIT_TOKEN. Prints {"result": ...} or, for the package's APIError,
{"error_code": ..., "error_info": ...}. Anything else it raises ends in a traceback, exit 1.
Run by .venv-clients/bin/python (make clients), never by phabmesh's own virtualenv."""

import functools
import json
import os
import sys

from phabricator import APIError, Phabricator

api, method, params = sys.argv[1:4]
client = Phabricator(host=api, token=os.environ["CONDUIT_TOKEN"])
try:
    answer = functools.reduce(getattr, method.split("."), client)(**json.loads(params))
except APIError as exc:
    print(json.dumps({"error_code": exc.code, "error_info": exc.message}))
else:
    print(json.dumps({"result": answer.response}))
