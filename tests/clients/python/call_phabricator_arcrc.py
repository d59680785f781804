"""One Conduit call with the phabricator package, unchanged from PyPI, configured by nothing
but ``~/.arcrc`` (its first host, and that host's token, as phabmesh's agent writes it):
``python call_phabricator_arcrc.py METHOD PARAMS_JSON``. Prints {"result": ...} or, for the
package's APIError, {"error_code": ..., "error_info": ...}. Run by .venv-clients/bin/python."""

import functools
import json
import sys

from phabricator import APIError, Phabricator

method, params = sys.argv[1:3]
client = Phabricator()  # no host, no token: ~/.arcrc's
try:
    answer = functools.reduce(getattr, method.split("."), client)(**json.loads(params))
except APIError as exc:
    print(json.dumps({"error_code": exc.code, "error_info": exc.message}))
else:
    print(json.dumps({"result": answer.response}))
