// LIVEMIG_BENCH_ROWS: the QEMU benches run only the rows named there (comma-separated keys: the
// precopy rows' stream, multifd2, multifd4, zero, downtime; the postcopy bench's postcopy, wan).

const ROW_KEYS = process.env['LIVEMIG_BENCH_ROWS']?.split(',').filter((s) => s !== '');

/** Whether the row called `key` runs (every row does when LIVEMIG_BENCH_ROWS is unset). */
export const wantRow = (key: string): boolean => ROW_KEYS === undefined || ROW_KEYS.includes(key);
