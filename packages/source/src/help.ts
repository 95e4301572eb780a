// livemig-source --help: every flag and what it does.

import { GUEST_HELP } from '@livemig/machine';

export const HELP = `usage: livemig-source [guest flags] [--qmp ADDR] [--migrate URI] [options]

Runs a guest (RAM blocks, vCPU threads running a workload, devices) and migrates it to a
livemig-destination or a QEMU destination in QEMU's migration stream format.

migration:
  --migrate URI            migrate at start: tcp:HOST:PORT | unix:PATH | fd:N | exec:CMD | file:PATH
  --capabilities LIST      capabilities to set first, comma-separated: NAME turns it on, NAME=off
                           off (return-path, events, xbzrle, auto-converge, postcopy-ram,
                           postcopy-preempt, multifd, ...). return-path is on by default here
                           (QEMU's is off): completed then means the destination loaded the
                           stream; exec: and file: migrations leave it out unless it was set
  --parameters LIST        parameters to set first, NAME=VALUE comma-separated
                           (e.g. max-bandwidth=0,downtime-limit=300; max-bandwidth 0 = unlimited;
                           multifd-channels=2: the destination needs multifd with the same count).
                           The convergence policy (off unless a timeout is set; README; it acts
                           on this, the outgoing side, only: a destination takes and ignores it):
                           x-livemig-no-progress-timeout=MS, x-livemig-completion-timeout-per-gib=MS,
                           x-livemig-downtime-limit-step=MS, x-livemig-downtime-limit-max=MS,
                           x-livemig-convergence-last-step=none|postcopy|cancel
  --exit-after-migrate     exit when the migration ends: status 0 if completed, 1 otherwise
  -S, --paused             do not start the guest (QEMU's -S); QMP cont starts it
  --uuid UUID              the guest's UUID (QEMU's -uuid): with capability validate-uuid the stream
                           carries it (configuration/uuid) and a destination with another refuses it
  --timeline FILE          write each migration's timeline (samples every 100 ms and events, one
                           JSON document; \`livemig report FILE\` draws it) to FILE when it ends
  --realtime-postcopy      with postcopy-preempt, run the page server thread (which answers page
                           requests) under SCHED_FIFO, priority 2. Needs CAP_SYS_NICE (e.g. root);
                           without it a warning is logged and nothing changes
  --shared-ram             guest RAM in memfds (shared memory that survives an exec), as cpr-exec
                           needs; requires the native addon (@livemig/native)
  --incoming-cpr FILE      be the new image of a cpr-exec (its cpr-exec-command): map the RAM the
                           old image handed over, load the device state from FILE (the migrate
                           file: URI) and run the guest on. Give the same guest flags as before
  --load-state FILE        start from a saved migration stream instead of a fresh guest: its RAM
                           and device state (blocks matched by name and size). With a recorded
                           QEMU machine type FILE may be QEMU's own (migrate "exec:cat > FILE"):
                           QEMU's devices are carried and sent on to the next QEMU

cpr-exec (live update in place, same PID): migrate-set-parameters mode=cpr-exec and
cpr-exec-command=[argv of the new image, e.g. node .../main.js --incoming-cpr FILE ...], then
migrate file:FILE. RAM is not copied; on a failed exec the guest runs on here, status failed.

${GUEST_HELP}

exit status: 0 done, 1 the migration failed (--exit-after-migrate), 2 a flag or address that
cannot be used (checked before the guest is prepared), 70 an internal error, 130/143 a signal.

QMP commands: migrate (resume=true after a postcopy pause), migrate_cancel, migrate-start-postcopy,
migrate-pause, migrate-continue (after pre-switchover), query-migrate, migrate-set-capabilities,
query-migrate-capabilities, migrate-set-parameters, query-migrate-parameters, stop, cont,
query-status, x-query-guest-digest, x-query-migration-timeline (the current or last migration's
timeline), calc-dirty-rate, query-dirty-rate, object-add, object-del (TLS credentials, authz),
quit; introspection as QEMU's: query-commands, query-events, query-name, query-version,
query-qmp-schema. Events: MIGRATION, MIGRATION_PASS, LIVEMIG_CONVERGENCE (each decision of
the convergence policy; these three with capability "events"), STOP, RESUME, SHUTDOWN (on quit,
SIGINT, SIGTERM).
`;
