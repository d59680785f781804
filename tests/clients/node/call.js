// One Conduit call with canduit, unchanged from npm, configured with only the API URL and a
// token: `node call.js API_URL METHOD PARAMS_JSON` with the token in CONDUIT_TOKEN. Prints
// {"result": ...} or, for the Conduit error canduit returns, {"error_code": ..., "error_info": ...}.
// Any other failure: canduit's error on stderr and exit status 1.
'use strict';

const createCanduit = require('canduit');

const [api, method, params] = process.argv.slice(2);

createCanduit({ api, token: process.env.CONDUIT_TOKEN }, (err, canduit) => {
  if (err) {
    console.error(String(err));
    process.exit(1);
  }
  canduit.exec(method, JSON.parse(params), (error, result) => {
    if (error && /^ERR-/.test(String(error.code))) {
      console.log(JSON.stringify({ error_code: error.code, error_info: error.message }));
    } else if (error) {
      console.error(String(error));
      process.exit(1);
    } else {
      console.log(JSON.stringify({ result }));
    }
  });
});
