import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { LogAssistedDisk } from "../lib/disk.ts";
import { encodeEntryHeader, ENTRY_HEADER_BYTES, makeEntryHeader } from "../lib/format/entry.ts";
import { listSegments, readManifest } from "../lib/format/logdir.ts";
import { nextSeqAfterSealed } from "../lib/format/manifest.ts";
import { restoreAt } from "../lib/restore.ts";
import { takeSnapshot } from "../lib/snapshot.ts";
import { verifyLogdir } from "../lib/verify.ts";
import { applyCrashOp, crashWorkload } from "./_crash_child.ts";
import {
  assertBytesEqual,
  FakeClock,
  makeImage,
  readAll,
  withSeed,
  withTempDir,
} from "./_helpers.ts";

const DEVICE_BYTES = 256 * 1024 + 512;
const FLUSH_EVERY = 8;
/** Small segments, so that kills land before, during and after seals. */
const SEGMENT_BYTES_MAX = 96 * 1024;
/** A child that has not been killed by then is stuck; the test kills it and fails. */
const CHILD_WATCHDOG_MS = 120_000;

const PROJECT_ROOT = fileURLToPath(new URL("..", import.meta.url));
const CHILD_SCRIPT = fileURLToPath(new URL("./_crash_child.ts", import.meta.url));

interface ChildRun {
  /** Seq the child's first entry carries. */
  startSeq: number;
  /** Every flush the child reported complete before it died. */
  flushes: { seq: number; ops: number }[];
}

/** Splits a byte stream into lines; an unterminated last line (cut by the kill) is dropped. */
async function* readLines(stream: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  let pending = "";
  for await (const chunk of stream) {
    pending += decoder.decode(chunk, { stream: true });
    for (let newline = pending.indexOf("\n"); newline >= 0; newline = pending.indexOf("\n")) {
      yield pending.slice(0, newline);
      pending = pending.slice(newline + 1);
    }
  }
}

/**
 * Runs the crash child until it has reported `killAfterFlushes` flushes, waits `delayMs` more
 * while it keeps writing, then kills it with SIGKILL and collects what it printed.
 */
async function runChildUntilKilled(
  devicePath: string,
  logdir: string,
  seed: number,
  killAfterFlushes: number,
  delayMs: number,
): Promise<ChildRun> {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      CHILD_SCRIPT,
      devicePath,
      logdir,
      String(seed),
      String(FLUSH_EVERY),
      String(SEGMENT_BYTES_MAX),
    ],
    cwd: PROJECT_ROOT,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const watchdog = setTimeout(() => child.kill("SIGKILL"), CHILD_WATCHDOG_MS);
  const lines: string[] = [];
  let killed = false;
  try {
    for await (const line of readLines(child.stdout)) {
      lines.push(line);
      const flushes = lines.filter((l) => l.startsWith("flushed ")).length;
      if (!killed && flushes >= killAfterFlushes) {
        if (delayMs > 0) await new Promise((resolve) => setTimeout(resolve, delayMs));
        child.kill("SIGKILL");
        killed = true;
      }
    }
  } finally {
    clearTimeout(watchdog);
    if (!killed) {
      try {
        child.kill("SIGKILL");
      } catch { /* it already exited */ }
    }
    const status = await child.status;
    const stderrText = await stderr;
    assert.equal(
      status.signal,
      "SIGKILL",
      `the child should die of SIGKILL, it exited with ${status.code}: ${stderrText}`,
    );
  }
  const [open, ...rest] = lines;
  const openMatch = /^open (\d+) \d+ \d+$/.exec(open ?? "");
  assert.ok(openMatch !== null, `first line should be "open ...": ${open}`);
  const flushes = rest.map((line) => {
    const match = /^flushed (\d+) (\d+)$/.exec(line);
    assert.ok(match !== null, `unexpected child output: ${line}`);
    return { seq: Number(match[1]), ops: Number(match[2]) };
  });
  assert.ok(flushes.length >= killAfterFlushes, `${flushes.length} flushes reported`);
  return { startSeq: Number(openMatch[1]), flushes };
}

/**
 * Rebuilds the device at each seq in `wantedSeqs` (up to `lastSeq`) by replaying the child's
 * workload on `start`: each operation is one entry, and every FLUSH_EVERY operations one flush.
 */
function modelAtSeqs(
  start: Uint8Array,
  seed: number,
  startSeq: number,
  lastSeq: number,
  wantedSeqs: Set<number>,
): Map<number, Uint8Array> {
  const image = new Uint8Array(start);
  const models = new Map<number, Uint8Array>();
  if (wantedSeqs.has(startSeq - 1)) models.set(startSeq - 1, image.slice());
  let seq = startSeq;
  let ops = 0;
  for (const op of crashWorkload(seed, image.length)) {
    if (seq > lastSeq) break;
    applyCrashOp(image, op);
    if (wantedSeqs.has(seq)) models.set(seq, image.slice());
    seq++;
    ops++;
    if (ops % FLUSH_EVERY === 0) {
      if (wantedSeqs.has(seq)) models.set(seq, image.slice());
      seq++;
    }
  }
  return models;
}

async function assertRestoresTo(
  logdir: string,
  output: string,
  at: { kind: "seq"; seq: number } | undefined,
  expected: Uint8Array,
  what: string,
): Promise<void> {
  const result = await restoreAt(logdir, output, { at });
  if (at !== undefined) assert.equal(result.targetSeq, at.seq, `${what}: target seq`);
  assertBytesEqual(readAll(output), expected, what);
  await Deno.remove(output);
}

Deno.test("LogAssistedDisk survives kill -9: flushed writes restore and reopen replays the tail", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const devicePath = join(dir, "disk.img");
      const logdir = join(dir, "log");
      await makeImage(devicePath, DEVICE_BYTES, (bytes) => random.fill(bytes.subarray(0, 65536)));
      await takeSnapshot(devicePath, logdir);
      const rounds = [
        { killAfterFlushes: 1, delayMs: 0 },
        { killAfterFlushes: 4, delayMs: 2 },
        { killAfterFlushes: 7, delayMs: 0 },
        { killAfterFlushes: 12, delayMs: 9 },
      ];
      // Every flushed state of every round, checked again at the end: crashes never rewrite history.
      const checkpoints: { seq: number; image: Uint8Array }[] = [];
      for (const [round, { killAfterFlushes, delayMs }] of rounds.entries()) {
        const what = `round ${round}`;
        const seed = random.int(0, 2 ** 31);
        const before = readAll(devicePath);
        const run = await runChildUntilKilled(devicePath, logdir, seed, killAfterFlushes, delayMs);

        const sealedThroughSeq = nextSeqAfterSealed(await readManifest(logdir)) - 1;
        const disk = await LogAssistedDisk.open(devicePath, logdir);
        const writer = disk.writer!;
        const latestSeq = writer.nextSeq - 1;
        try {
          // The torn tail, if the kill left one, is gone from the live segment.
          const live = writer.recovery;
          assert.equal(fs.statSync(live.segmentPath).size, live.validBytes, `${what}: truncated`);
          assert.equal(disk.recovery.tornBytes, live.tornBytes);
          const lastFlushedSeq = run.flushes.at(-1)!.seq;
          assert.ok(
            latestSeq >= lastFlushedSeq,
            `${what}: the log ends at seq ${latestSeq}, before the flushed seq ${lastFlushedSeq}`,
          );
          // Replay re-applies only what the device may lack: never a sealed entry.
          assert.ok(
            disk.recovery.replayedEntries <= latestSeq - sealedThroughSeq,
            `${what}: replay`,
          );
        } finally {
          await disk.close();
        }

        const wanted = new Set([latestSeq, ...run.flushes.map((f) => f.seq)]);
        const models = modelAtSeqs(before, seed, run.startSeq, latestSeq, wanted);
        for (const flush of run.flushes) {
          // The child's seq bookkeeping matches the model's: one entry per op, one per flush.
          const expectedSeq = run.startSeq + flush.ops + flush.ops / FLUSH_EVERY - 1;
          assert.equal(flush.seq, expectedSeq, `${what}: seq of the flush after ${flush.ops} ops`);
          checkpoints.push({ seq: flush.seq, image: models.get(flush.seq)! });
        }
        const latest = models.get(latestSeq)!;
        assertBytesEqual(readAll(devicePath), latest, `${what}: the device after reopen`);
        await assertRestoresTo(
          logdir,
          join(dir, "latest.img"),
          undefined,
          latest,
          `${what}: latest`,
        );
        const lastFlush = run.flushes.at(-1)!;
        await assertRestoresTo(
          logdir,
          join(dir, "flushed.img"),
          { kind: "seq", seq: lastFlush.seq },
          models.get(lastFlush.seq)!,
          `${what}: the last flushed seq ${lastFlush.seq}`,
        );
        const verified = await verifyLogdir(logdir);
        assert.deepEqual(verified.problems, [], `${what}: verify problems`);
        assert.equal(verified.tornTail, undefined, `${what}: a torn tail after reopen`);
        assert.equal(verified.lastSeq, latestSeq, `${what}: reopening appends nothing`);
      }
      const manifest = await readManifest(logdir);
      assert.ok(manifest.segments.length > 0, "the rounds sealed segments");
      for (const checkpoint of checkpoints) {
        await assertRestoresTo(
          logdir,
          join(dir, "checkpoint.img"),
          { kind: "seq", seq: checkpoint.seq },
          checkpoint.image,
          `checkpoint at seq ${checkpoint.seq}`,
        );
      }
    });
  });
});

/** A logdir with a few flushed writes; returns the model of the device. */
async function makeWrittenLogdir(
  devicePath: string,
  logdir: string,
  clock: FakeClock,
): Promise<Uint8Array> {
  const model = await makeImage(devicePath, 65536, (bytes) => bytes.fill(7, 0, 4096));
  await takeSnapshot(devicePath, logdir, { clock: clock.fn });
  const disk = await LogAssistedDisk.open(devicePath, logdir, { clock: clock.fn });
  try {
    for (let i = 0; i < 5; i++) {
      clock.advance(1000);
      const data = new Uint8Array(1000).fill(0x10 + i);
      await disk.write(i * 3000, data);
      model.set(data, i * 3000);
    }
    await disk.flush();
  } finally {
    await disk.close();
  }
  return model;
}

async function livePath(logdir: string): Promise<string> {
  const segments = await listSegments(logdir, await readManifest(logdir));
  const live = segments.filter((segment) => !segment.sealed);
  assert.equal(live.length, 1);
  return live[0].path;
}

/** The encoded bytes of a write entry with the given seq and time. */
function encodedWrite(seq: number, timeUs: number, offsetBytes: number, data: Uint8Array) {
  const header = makeEntryHeader(
    { kind: "write", seq, timeUs, offsetBytes, lengthBytes: data.length },
    data,
  );
  const bytes = new Uint8Array(ENTRY_HEADER_BYTES + data.length);
  encodeEntryHeader(header, bytes);
  bytes.set(data, ENTRY_HEADER_BYTES);
  return bytes;
}

Deno.test("LogAssistedDisk.open() truncates half an appended entry and verify is clean after", async () => {
  await withTempDir(async (dir) => {
    const devicePath = join(dir, "disk.img");
    const logdir = join(dir, "log");
    const clock = new FakeClock();
    const model = await makeWrittenLogdir(devicePath, logdir, clock);
    const path = await livePath(logdir);
    const validBytes = fs.statSync(path).size;
    const torn = encodedWrite(7, clock.advance(1000), 0, new Uint8Array(3000).fill(0xee));
    const halfBytes = Math.floor(torn.length / 2);
    fs.appendFileSync(path, torn.subarray(0, halfBytes));

    // Before reopening, a reader sees a torn tail: normal after a crash, not a problem.
    const before = await verifyLogdir(logdir);
    assert.deepEqual(before.problems, []);
    assert.deepEqual(before.tornTail, {
      path,
      offsetBytes: validBytes,
      bytes: halfBytes,
      problem: "entry extends past end of file",
    });

    const disk = await LogAssistedDisk.open(devicePath, logdir, { clock: clock.fn });
    try {
      assert.equal(disk.recovery.tornBytes, halfBytes);
      assert.equal(disk.writer!.recovery.validBytes, validBytes);
      assert.equal(disk.writer!.nextSeq, 7, "the torn entry's seq is given out again");
    } finally {
      await disk.close();
    }
    assert.equal(fs.statSync(path).size, validBytes);
    const after = await verifyLogdir(logdir);
    assert.ok(after.ok);
    assert.equal(after.tornTail, undefined);
    assert.equal(after.lastSeq, 6);
    const output = join(dir, "latest.img");
    await restoreAt(logdir, output, { nowUs: clock.nowUs });
    assertBytesEqual(readAll(output), model, "restore after the torn append");
    assertBytesEqual(readAll(devicePath), model, "the device after the torn append");
  });
});

Deno.test("LogAssistedDisk.open() replays a journaled write that never reached the device", async () => {
  await withTempDir(async (dir) => {
    const devicePath = join(dir, "disk.img");
    const logdir = join(dir, "log");
    const clock = new FakeClock();
    const model = await makeWrittenLogdir(devicePath, logdir, clock);
    // A kill between the journal append and the device write leaves exactly this.
    const data = new Uint8Array(2048).fill(0xab);
    fs.appendFileSync(await livePath(logdir), encodedWrite(7, clock.advance(1000), 8192, data));
    model.set(data, 8192);

    const disk = await LogAssistedDisk.open(devicePath, logdir, { clock: clock.fn });
    try {
      assert.deepEqual(disk.recovery, { tornBytes: 0, replayedEntries: 1 });
      assert.equal(disk.writer!.nextSeq, 8);
    } finally {
      await disk.close();
    }
    assertBytesEqual(readAll(devicePath), model, "the device after replay");
    const output = join(dir, "latest.img");
    await restoreAt(logdir, output, { nowUs: clock.nowUs });
    assertBytesEqual(readAll(output), model, "restore of the latest state");
  });
});
