#!/bin/sh
':' //; [ "$1" = analyze ] && unset NODE_EXTRA_CA_CERTS; f=$0; [ -L "$f" ] && f=$(readlink -f "$f"); case $f in */*) ;; *) f=./$f;; esac; exec node "${f%/*}/../dist/main.cjs" "$@"
// The `livemig` command, read by sh, which runs the line above (to Node a string and a comment):
// `analyze` opens no connection, so Node need not parse a NODE_EXTRA_CA_CERTS file at start
// (~35 ms here); every other command keeps it. Node then runs dist/main.cjs, CommonJS, without
// starting its ES module loader as it would for this file (~10 ms). Run by Node itself (`node
// bin/livemig.js`, or a link made when this file began with `#!/usr/bin/env node`) it works the
// same, that file parsed. A committed file, not dist/main.cjs itself, so that pnpm links the bin on
// a fresh install before `tsc -b` has built dist/; root `pnpm livemig …` runs it through that link,
// with no run banner on stdout (`--json` output stays one JSON document).
import '../dist/main.cjs';
