#!/usr/bin/env node
// The `livemig` command. A committed file (not dist/main.js itself) so that pnpm links the bin
// on a fresh install, before `tsc -b` has built dist/; root `pnpm livemig …` runs it through that
// link, with no run banner on stdout (`--json` output stays one JSON document).
import '../dist/main.js';
