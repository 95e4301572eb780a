#!/bin/sh
':' //; [ "$1" = analyze ] && unset NODE_EXTRA_CA_CERTS; exec node "$0" "$@"
// The `livemig` command, read twice: by sh, which runs the line above, then by Node, to which that
// line is a string and a comment. `analyze` opens no connection, so Node need not parse a
// NODE_EXTRA_CA_CERTS file at start (~35 ms here); every other command keeps it. A committed file
// (not dist/main.js itself) so that pnpm links the bin on a fresh install, before `tsc -b` has
// built dist/; root `pnpm livemig …` runs it through that link, with no run banner on stdout
// (`--json` output stays one JSON document). Run by Node directly (`node bin/livemig.js`, or a
// link made when this file began with `#!/usr/bin/env node`), it works the same, CA file parsed.
import '../dist/main.js';
