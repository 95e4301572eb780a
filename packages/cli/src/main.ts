// `node dist/main.js`, as scripts, tests and the README run the command: it is main.cts.
import './main.cts';
