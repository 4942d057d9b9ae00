import assert from "node:assert/strict";
import { concatBytes } from "../lib/byte_sink.ts";
import * as fs from "node:fs";
import { join } from "node:path";
import { BusyError, exitCodeFor } from "../lib/errors.ts";
import {
  encodeEntryHeader,
  ENTRY_HEADER_BYTES,
  type EntryHeader,
  makeEntryHeader,
} from "../lib/format/entry.ts";
import { LogdirLock, readLogEntries, readManifest, SEGMENTS_DIR } from "../lib/format/logdir.ts";
import { LogdirWriter } from "../lib/format/logdir_writer.ts";
import { segmentFileName } from "../lib/format/segment.ts";
import { takeSnapshot } from "../lib/snapshot.ts";
import { FakeClock, makeImage, withSeed, withTempDir } from "./_helpers.ts";

const WRITE_BYTES = 512;
const ENTRY_BYTES = ENTRY_HEADER_BYTES + WRITE_BYTES;

/** A logdir with a base snapshot of a 64 KiB image, taken at the clock's time. */
async function makeLogdir(dir: string, clock: FakeClock): Promise<string> {
  const devicePath = join(dir, "disk.img");
  const logdir = join(dir, "log");
  await makeImage(devicePath, 65536);
  await takeSnapshot(devicePath, logdir, { clock: clock.fn, hostId: "test-host" });
  return logdir;
}

/** Waits for the writer to accept an append, then appends one 512-byte write. */
async function appendWrite(writer: LogdirWriter, fill: number) {
  await writer.ready();
  return writer.appendSync(
    "write",
    fill * WRITE_BYTES,
    WRITE_BYTES,
    new Uint8Array(512).fill(fill),
  );
}

async function readSeqs(logdir: string): Promise<number[]> {
  const manifest = await readManifest(logdir);
  const seqs: number[] = [];
  for await (const entry of readLogEntries(logdir, manifest, { headersOnly: true })) {
    seqs.push(entry.header.seq);
  }
  return seqs;
}

Deno.test("LogdirWriter.open() throws BusyError naming the first holder's pid", async () => {
  await withTempDir(async (dir) => {
    const logdir = await makeLogdir(dir, new FakeClock());
    const first = await LogdirWriter.open(logdir, { purpose: "watch" });
    try {
      await assert.rejects(LogdirWriter.open(logdir, { purpose: "mark" }), (error: unknown) => {
        assert.ok(error instanceof BusyError, `BusyError, got ${error}`);
        assert.equal(error.holderPid, Deno.pid);
        assert.equal(
          error.message,
          `Cannot mark ${logdir}: another process holds its lock (pid ${Deno.pid}, watch)`,
        );
        assert.equal(exitCodeFor(error), 4);
        return true;
      });
      // A failed attempt must not release or rewrite the holder's lock.
      assert.equal(fs.readFileSync(join(logdir, "lock"), "utf8"), `${Deno.pid} watch\n`);
      await assert.rejects(LogdirLock.acquire(logdir, "snapshot"), BusyError);
    } finally {
      await first.close();
    }
    const second = await LogdirWriter.open(logdir, { purpose: "mark" });
    await second.close();
  });
});

Deno.test("LogdirLock.acquire() twice gives BusyError until the first is released", async () => {
  await withTempDir(async (dir) => {
    const logdir = await makeLogdir(dir, new FakeClock());
    const lock = await LogdirLock.acquire(logdir, "compact");
    try {
      await assert.rejects(LogdirLock.acquire(logdir, "watch"), (error: unknown) => {
        assert.ok(error instanceof BusyError);
        assert.equal(error.holderPid, Deno.pid);
        assert.match(error.message, new RegExp(`\\(pid ${Deno.pid}, compact\\)$`));
        return true;
      });
    } finally {
      lock.release();
    }
    assert.equal(fs.readFileSync(join(logdir, "lock"), "utf8"), "", "release clears the pid");
    const again = await LogdirLock.acquire(logdir, "watch");
    again.release();
  });
});

Deno.test("LogdirWriter seals full segments into the manifest with their seq, time and size", async () => {
  await withTempDir(async (dir) => {
    const clock = new FakeClock();
    const logdir = await makeLogdir(dir, clock);
    let seals = 0;
    // The entry that crosses the limit is the last of its segment: 3 entries per segment.
    const writer = await LogdirWriter.open(logdir, {
      purpose: "test",
      clock: clock.fn,
      segmentBytesMax: 2 * ENTRY_BYTES + 1,
      device: {
        syncThrough: () => {
          seals++;
          return Promise.resolve();
        },
      },
    });
    const times: number[] = [];
    try {
      for (let i = 1; i <= 10; i++) {
        clock.advance(1000);
        const header = await appendWrite(writer, i);
        assert.equal(header.seq, i);
        times.push(header.timeUs);
      }
      // Seals run in the background; a sync waits for the one in progress.
      await writer.sync();
      assert.equal(seals, 3);
      const manifest = await readManifest(logdir);
      assert.deepEqual(manifest, writer.manifest);
      assert.deepEqual(
        manifest.segments,
        [1, 4, 7].map((firstSeq) => ({
          file: segmentFileName(firstSeq),
          firstSeq,
          lastSeq: firstSeq + 2,
          firstUs: times[firstSeq - 1],
          lastUs: times[firstSeq + 1],
          sizeBytes: 3 * ENTRY_BYTES,
          entries: 3,
        })),
      );
      for (const segment of manifest.segments) {
        const path = join(logdir, SEGMENTS_DIR, segment.file);
        assert.equal(fs.statSync(path).size, segment.sizeBytes, segment.file);
      }
      const livePath = join(logdir, SEGMENTS_DIR, segmentFileName(10));
      assert.equal(fs.statSync(livePath).size, ENTRY_BYTES, "the live segment holds seq 10");
    } finally {
      await writer.close({ seal: true });
    }
    const manifest = await readManifest(logdir);
    assert.deepEqual(manifest.segments.at(-1), {
      file: segmentFileName(10),
      firstSeq: 10,
      lastSeq: 10,
      firstUs: times[9],
      lastUs: times[9],
      sizeBytes: ENTRY_BYTES,
      entries: 1,
    });
    assert.deepEqual(await readSeqs(logdir), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  });
});

Deno.test("LogdirWriter.rotate() of an empty live segment changes nothing", async () => {
  await withTempDir(async (dir) => {
    const clock = new FakeClock();
    const logdir = await makeLogdir(dir, clock);
    const before = fs.readFileSync(join(logdir, "manifest.json"));
    const writer = await LogdirWriter.open(logdir, {
      purpose: "test",
      clock: clock.fn,
      journalOnly: true,
    });
    try {
      await writer.rotate();
      assert.equal(writer.nextSeq, 1);
    } finally {
      await writer.close({ seal: true });
    }
    assert.deepEqual(fs.readFileSync(join(logdir, "manifest.json")), before);
  });
});

Deno.test("LogdirWriter stamps seq + 1 and clamps time when the clock steps back", async () => {
  await withTempDir(async (dir) => {
    const clock = new FakeClock();
    const logdir = await makeLogdir(dir, clock);
    const horizonUs = (await readManifest(logdir)).horizonUs;
    let writer = await LogdirWriter.open(logdir, {
      purpose: "test",
      clock: clock.fn,
      segmentBytesMax: 2 * ENTRY_BYTES + 1,
    });
    const stamps: [number, number][] = [];
    try {
      clock.advance(-60_000_000); // behind the snapshot: clamped to the horizon
      stamps.push(toStamp(await appendWrite(writer, 1)));
      clock.nowUs = horizonUs + 5000;
      stamps.push(toStamp(await appendWrite(writer, 2)));
      clock.advance(-3000);
      stamps.push(toStamp(await appendWrite(writer, 3))); // clamped, then a seal
      clock.advance(-1_000_000);
      stamps.push(toStamp(await appendWrite(writer, 4))); // clamped across the seal
      clock.nowUs = horizonUs + 9000;
      stamps.push(toStamp(await appendWrite(writer, 5)));
    } finally {
      await writer.close();
    }
    // Reopening learns the last stamp from the live segment and keeps clamping to it.
    clock.nowUs = horizonUs;
    writer = await LogdirWriter.open(logdir, {
      purpose: "test",
      clock: clock.fn,
      journalOnly: true,
    });
    try {
      assert.equal(writer.lastTimeUs, horizonUs + 9000);
      stamps.push(toStamp(await appendWrite(writer, 6)));
    } finally {
      await writer.close();
    }
    assert.deepEqual(stamps, [
      [1, horizonUs],
      [2, horizonUs + 5000],
      [3, horizonUs + 5000],
      [4, horizonUs + 5000],
      [5, horizonUs + 9000],
      [6, horizonUs + 9000],
    ]);
    assert.deepEqual(await readSeqs(logdir), [1, 2, 3, 4, 5, 6]);
  });
});

function toStamp(header: { seq: number; timeUs: number }): [number, number] {
  return [header.seq, header.timeUs];
}

Deno.test("LogdirWriter.sync() group-commits many concurrent calls into far fewer fsyncs", async () => {
  await withTempDir(async (dir) => {
    const clock = new FakeClock();
    const logdir = await makeLogdir(dir, clock);
    const writer = await LogdirWriter.open(logdir, {
      purpose: "test",
      clock: clock.fn,
      journalOnly: true,
    });
    try {
      const before = writer.syncCount;
      const calls: Promise<void>[] = [];
      for (let i = 0; i < 100; i++) {
        writer.appendSync("write", 0, WRITE_BYTES, new Uint8Array(WRITE_BYTES).fill(i));
        calls.push(writer.sync());
      }
      await Promise.all(calls);
      // The first call starts an fsync; the 99 made while it runs share the one after it.
      assert.ok(
        writer.syncCount - before <= 2,
        `${writer.syncCount - before} fsyncs for 100 calls`,
      );
      assert.ok(writer.syncCount - before >= 1);

      // A call made after an fsync finished starts a new one: nothing is answered by a stale run.
      const sequential = writer.syncCount;
      for (let i = 0; i < 3; i++) await writer.sync();
      assert.equal(writer.syncCount - sequential, 3);
    } finally {
      await writer.close();
    }
  });
});

Deno.test("LogdirWriter.open() after close continues the seq in the same live segment", async () => {
  await withTempDir(async (dir) => {
    const clock = new FakeClock();
    const logdir = await makeLogdir(dir, clock);
    let writer = await LogdirWriter.open(logdir, {
      purpose: "test",
      clock: clock.fn,
      journalOnly: true,
    });
    try {
      await appendWrite(writer, 1);
      await appendWrite(writer, 2);
      writer.appendSync("flush", 0, 0);
      await appendWrite(writer, 4);
      await appendWrite(writer, 5);
    } finally {
      await writer.close();
    }
    writer = await LogdirWriter.open(logdir, {
      purpose: "test",
      clock: clock.fn,
      journalOnly: true,
    });
    try {
      const livePath = join(logdir, SEGMENTS_DIR, segmentFileName(1));
      assert.deepEqual(writer.recovery, {
        tornBytes: 0,
        tornProblem: undefined,
        removedFiles: [],
        segmentPath: livePath,
        validBytes: 4 * ENTRY_BYTES + ENTRY_HEADER_BYTES,
        replayFromSeq: 6,
        lastChangeSeq: 5,
      });
      assert.equal(writer.nextSeq, 6);
      assert.equal((await appendWrite(writer, 6)).seq, 6);
    } finally {
      await writer.close({ seal: true });
    }
    // After a seal the next writer starts a new live segment at the next seq.
    writer = await LogdirWriter.open(logdir, {
      purpose: "test",
      clock: clock.fn,
      journalOnly: true,
    });
    try {
      assert.equal(writer.nextSeq, 7);
      assert.equal(writer.recovery.segmentPath, join(logdir, SEGMENTS_DIR, segmentFileName(7)));
      assert.equal((await appendWrite(writer, 7)).seq, 7);
    } finally {
      await writer.close();
    }
    assert.deepEqual(await readSeqs(logdir), [1, 2, 3, 4, 5, 6, 7]);
  });
});

Deno.test({
  name: "LogdirWriter.open() seals a complete segment a crash left unsealed before the live one",
  // The first writer is abandoned mid-seal, as a crash would leave it: its files stay open.
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    await withTempDir(async (dir) => {
      const clock = new FakeClock();
      const logdir = await makeLogdir(dir, clock);
      const lock = await LogdirLock.acquire(logdir, "test");
      try {
        const crashed = await LogdirWriter.open(logdir, {
          purpose: "test",
          clock: clock.fn,
          lock,
          segmentBytesMax: 2 * ENTRY_BYTES + 1,
          // The device never answers: the seal never reaches the manifest.
          device: { syncThrough: () => new Promise(() => {}) },
        });
        for (let i = 1; i <= 5; i++) {
          clock.advance(1000);
          await appendWrite(crashed, i);
        }
        const unsealed = fs.readdirSync(join(logdir, SEGMENTS_DIR)).sort();
        assert.deepEqual(unsealed, [segmentFileName(1), segmentFileName(4)]);
        assert.deepEqual((await readManifest(logdir)).segments, []);

        const recovered = await LogdirWriter.open(logdir, {
          purpose: "test",
          clock: clock.fn,
          lock,
          journalOnly: true,
        });
        assert.equal(recovered.nextSeq, 6);
        const manifest = await readManifest(logdir);
        assert.deepEqual(manifest.segments.map((s) => [s.firstSeq, s.lastSeq]), [[1, 3]]);
        clock.advance(1000);
        await appendWrite(recovered, 6);
        await recovered.close({ seal: true });
        assert.deepEqual(await readSeqs(logdir), [1, 2, 3, 4, 5, 6]);
      } finally {
        lock.release();
      }
    });
  },
});

Deno.test("LogdirWriter.appendExistingRun() writes the same segments as one appendExisting per entry", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const clock = new FakeClock();
      // Entries of random sizes, already encoded as a receiver gets them.
      const headers: EntryHeader[] = [];
      const encoded: Uint8Array[] = [];
      let timeUs = clock.nowUs;
      for (let seq = 1; seq <= 40; seq++) {
        timeUs += random.int(0, 2) * 1000;
        const payload = new Uint8Array(random.int(1, 3000));
        random.fill(payload);
        const header = makeEntryHeader(
          { kind: "write", seq, timeUs, offsetBytes: 0, lengthBytes: payload.length },
          payload,
        );
        const bytes = new Uint8Array(ENTRY_HEADER_BYTES + payload.length);
        encodeEntryHeader(header, bytes);
        bytes.set(payload, ENTRY_HEADER_BYTES);
        headers.push(header);
        encoded.push(bytes);
      }
      const logdirs = [join(dir, "one"), join(dir, "run")];
      for (const name of ["one", "run"]) {
        await Deno.mkdir(join(dir, name));
        await makeLogdir(join(dir, name), new FakeClock(clock.nowUs));
      }
      const options = { purpose: "test", segmentBytesMax: 8 * 1024, journalOnly: true };
      const one = await LogdirWriter.open(join(logdirs[0], "log"), options);
      for (const [i, header] of headers.entries()) {
        await one.ready();
        one.appendExisting(header, encoded[i].subarray(ENTRY_HEADER_BYTES));
      }
      await one.close({ seal: true });
      const run = await LogdirWriter.open(join(logdirs[1], "log"), options);
      // Frames of a few entries each, as receive gets them; a run stops early at a busy seal.
      for (let at = 0; at < headers.length;) {
        const count = Math.min(random.int(1, 9), headers.length - at);
        const frame = concatBytes(encoded.slice(at, at + count));
        let done = 0;
        while (done < count) {
          await run.ready();
          const offset = encoded.slice(at, at + done).reduce((sum, e) => sum + e.length, 0);
          done += run.appendExistingRun(
            frame.subarray(offset),
            headers.slice(at + done, at + count),
          );
        }
        at += count;
      }
      await run.close({ seal: true });
      const [a, b] = await Promise.all(logdirs.map((d) => readManifest(join(d, "log"))));
      assert.deepEqual(b.segments, a.segments);
      for (const segment of a.segments) {
        const path = (d: string) => join(d, "log", SEGMENTS_DIR, segment.file);
        assert.deepEqual(fs.readFileSync(path(logdirs[1])), fs.readFileSync(path(logdirs[0])));
      }
      assert.ok(a.segments.length > 3, "the runs crossed several seals");
    });
  });
});
