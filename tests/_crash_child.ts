/**
 * The child process of crash_test.ts: opens a log-assisted disk and writes a seeded workload until
 * it is killed, flushing every N operations and printing one line per completed flush:
 *
 * ```text
 * open <first seq this run appends> <torn bytes> <replayed entries>
 * flushed <seq of the last entry the flush covers> <operations done>
 * ```
 *
 * The parent draws the same operations from the same seed with {@linkcode crashWorkload}, so it
 * can rebuild the device at every seq without being told the data.
 *
 * Usage: `deno run -A tests/_crash_child.ts <device> <logdir> <seed> <flush-every> <segment-bytes>`
 *
 * @module
 */
import { LogAssistedDisk } from "../lib/disk.ts";
import { Random } from "./_helpers.ts";

/** Operations before the child stops on its own, so that an orphan cannot fill the disk. */
export const CRASH_OPS_MAX = 20_000;
/** Largest range one operation touches. */
export const CRASH_OP_BYTES_MAX = 16 * 1024;

/** One operation of the workload. */
export type CrashOp =
  | { kind: "write"; offsetBytes: number; data: Uint8Array }
  | { kind: "zero" | "trim"; offsetBytes: number; lengthBytes: number };

/** The endless seeded workload: mostly writes, some zeroes and trims, anywhere on the device. */
export function* crashWorkload(seed: number, deviceBytes: number): Generator<CrashOp> {
  const random = new Random(seed);
  while (true) {
    const offsetBytes = random.int(0, deviceBytes - 1);
    const lengthBytes = random.int(1, Math.min(deviceBytes - offsetBytes, CRASH_OP_BYTES_MAX));
    const pick = random.int(0, 9);
    if (pick < 7) {
      const data = new Uint8Array(lengthBytes);
      random.fill(data);
      yield { kind: "write", offsetBytes, data };
    } else {
      yield { kind: pick < 9 ? "zero" : "trim", offsetBytes, lengthBytes };
    }
  }
}

/** Applies an operation to an in-memory image (the parent's model). */
export function applyCrashOp(image: Uint8Array, op: CrashOp): void {
  if (op.kind === "write") image.set(op.data, op.offsetBytes);
  else image.fill(0, op.offsetBytes, op.offsetBytes + op.lengthBytes);
}

const encoder = new TextEncoder();

function printLine(line: string): void {
  const bytes = encoder.encode(line + "\n");
  let done = 0;
  while (done < bytes.length) done += Deno.stdout.writeSync(bytes.subarray(done));
}

async function main(args: string[]): Promise<void> {
  const [devicePath, logdir, seedText, flushEveryText, segmentBytesText] = args;
  const seed = Number(seedText);
  const flushEvery = Number(flushEveryText);
  const disk = await LogAssistedDisk.open(devicePath, logdir, {
    purpose: "crash-child",
    segmentBytesMax: Number(segmentBytesText),
  });
  const writer = disk.writer!;
  printLine(`open ${writer.nextSeq} ${disk.recovery.tornBytes} ${disk.recovery.replayedEntries}`);
  let ops = 0;
  for (const op of crashWorkload(seed, disk.sizeBytes)) {
    if (op.kind === "write") await disk.write(op.offsetBytes, op.data);
    else if (op.kind === "zero") await disk.zero(op.offsetBytes, op.lengthBytes);
    else await disk.trim(op.offsetBytes, op.lengthBytes);
    ops++;
    if (ops % flushEvery === 0) {
      await disk.flush();
      printLine(`flushed ${writer.nextSeq - 1} ${ops}`);
    }
    if (ops >= CRASH_OPS_MAX) break;
  }
  await disk.close();
}

if (import.meta.main) await main(Deno.args);
