/** Shared by the compaction tests: a logdir with a recorded history, restores, the CLI as a child. */
import * as fs from "node:fs";
import { join, relative } from "node:path";
import { LogAssistedDisk } from "../lib/disk.ts";
import { restoreAt } from "../lib/restore.ts";
import { takeSnapshot } from "../lib/snapshot.ts";
import { FakeClock, makeImage, type Random, readAll } from "./_helpers.ts";

/** Not a power of two: device-end edges matter. */
export const DEVICE_BYTES = 512 * 1024 + 3 * 512;
/** Small segments: many seals, and cuts fall inside segments. */
export const SEGMENT_BYTES_MAX = 24 * 1024;

/** The device image after each step, with the step's time. */
export interface HistoryPoint {
  timeUs: number;
  image: Uint8Array;
}

/** A logdir under test, the device behind it, its clock and every state it went through. */
export interface Workload {
  devicePath: string;
  logdir: string;
  clock: FakeClock;
  model: Uint8Array;
  history: HistoryPoint[];
  marks: { name: string; timeUs: number }[];
}

/** Takes a snapshot of a device with random content at the start; no entries yet. */
export async function makeWorkload(dir: string, random: Random): Promise<Workload> {
  const devicePath = join(dir, "disk.img");
  const logdir = join(dir, "log");
  const model = await makeImage(devicePath, DEVICE_BYTES, (b) => random.fill(b.subarray(0, 8192)));
  const clock = new FakeClock();
  await takeSnapshot(devicePath, logdir, { clock: clock.fn, hostId: "test-host" });
  return {
    devicePath,
    logdir,
    clock,
    model,
    history: [{ timeUs: clock.nowUs, image: model.slice() }],
    marks: [],
  };
}

/**
 * Appends `steps` random writes, zeroes, trims, flushes and marks through a log-assisted disk,
 * recording the image after each, then closes the disk (without sealing its live segment).
 */
export async function appendSteps(
  workload: Workload,
  random: Random,
  steps: number,
  options: { overwriteHot?: boolean } = {},
): Promise<void> {
  const { clock, model } = workload;
  const disk = await LogAssistedDisk.open(workload.devicePath, workload.logdir, {
    clock: clock.fn,
    segmentBytesMax: SEGMENT_BYTES_MAX,
  });
  for (let step = 0; step < steps; step++) {
    clock.advance(random.int(0, 3) * 1000); // equal times happen too
    const hot = options.overwriteHot === true && random.int(0, 1) === 0;
    const offset = hot ? random.int(0, 15) * 512 : random.int(0, DEVICE_BYTES - 1);
    const length = hot
      ? 512 * random.int(1, 4)
      : random.int(1, Math.min(DEVICE_BYTES - offset, 20_000));
    const kind = random.int(0, 19);
    if (kind < 12) {
      const data = new Uint8Array(length);
      random.fill(data);
      await disk.write(offset, data);
      model.set(data, offset);
    } else if (kind < 15) {
      await disk.zero(offset, length);
      model.fill(0, offset, offset + length);
    } else if (kind < 17) {
      await disk.trim(offset, length);
      model.fill(0, offset, offset + length);
    } else if (kind < 19) {
      await disk.flush();
    } else {
      const name = `mark-${workload.marks.length}`;
      await disk.mark(name);
      workload.marks.push({ name, timeUs: clock.nowUs });
    }
    workload.history.push({ timeUs: clock.nowUs, image: model.slice() });
  }
  await disk.close();
}

/** The device image as it was at `timeUs`: after the last step with a time at or before it. */
export function expectedAt(workload: Workload, timeUs: number): Uint8Array {
  return workload.history.findLast((point) => point.timeUs <= timeUs)!.image;
}

/** Restores `logdir` at `timeUs` into a fresh file and returns its bytes. */
export async function restoreBytes(
  logdir: string,
  timeUs: number,
  nowUs: number,
): Promise<Uint8Array> {
  const output = join(logdir, "..", `restore-${crypto.randomUUID()}.img`);
  await restoreAt(logdir, output, { at: { kind: "instant", timeUs }, nowUs });
  const bytes = readAll(output);
  fs.unlinkSync(output);
  return bytes;
}

/** Every file under `dir` with its bytes, keyed by relative path. */
export function filesUnder(dir: string): Map<string, Uint8Array> {
  const files = new Map<string, Uint8Array>();
  const visit = (path: string) => {
    for (const item of fs.readdirSync(path, { withFileTypes: true })) {
      const full = join(path, item.name);
      if (item.isDirectory()) visit(full);
      else if (item.isFile()) files.set(relative(dir, full), fs.readFileSync(full));
    }
  };
  visit(dir);
  return files;
}

/** What a CLI child process did. */
export interface CliRun {
  code: number;
  signal: Deno.Signal | null;
  stdout: string;
  stderr: string;
}

const CLI_PATH = new URL("../cli/main.ts", import.meta.url).pathname;

/** Runs `sectorlog <args>` as a child process. */
export async function runCli(args: string[], env: Record<string, string> = {}): Promise<CliRun> {
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", CLI_PATH, ...args],
    env: { NO_COLOR: "1", ...env },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  return {
    code: output.code,
    signal: output.signal,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr),
  };
}
