/**
 * Recovery after power cuts, one failure of issue 13 per test: the device and the journal agree
 * after a cut at any operation; a torn tail is decided from what was durably written, never from
 * guest bytes after it; a writer without the device leaves the replay a watch still owes.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { LogAssistedDisk } from "../lib/disk.ts";
import { IntegrityError } from "../lib/errors.ts";
import { encodeEntryHeader, ENTRY_HEADER_BYTES, makeEntryHeader } from "../lib/format/entry.ts";
import { LogdirLock, readManifest, SEGMENTS_DIR } from "../lib/format/logdir.ts";
import { LogdirWriter } from "../lib/format/logdir_writer.ts";
import { segmentFileName } from "../lib/format/segment.ts";
import { addMark } from "../lib/mark.ts";
import { restoreAt } from "../lib/restore.ts";
import { takeSnapshot } from "../lib/snapshot.ts";
import { CUT_MODES, type CutMode, PowerCutError, SimDisk } from "../lib/storage/sim_storage.ts";
import { readFileBytes } from "../lib/storage/storage.ts";
import { verifyLogdir } from "../lib/verify.ts";
import { FakeClock, makeImage, readAll, withTempDir } from "./_helpers.ts";

const WRITE_BYTES = 512;
const ENTRY_BYTES = ENTRY_HEADER_BYTES + WRITE_BYTES;

/** A logdir with a base snapshot of a 64 KiB image of zeroes. */
async function makeLogdir(
  dir: string,
  clock: FakeClock,
): Promise<{ device: string; logdir: string }> {
  const device = join(dir, "disk.img");
  const logdir = join(dir, "log");
  await makeImage(device, 65536);
  await takeSnapshot(device, logdir, { clock: clock.fn, hostId: "test-host" });
  return { device, logdir };
}

async function appendWrite(writer: LogdirWriter, fill: number) {
  await writer.ready();
  return writer.appendSync(
    "write",
    fill * WRITE_BYTES,
    WRITE_BYTES,
    new Uint8Array(512).fill(fill),
  );
}

/**
 * The workload of the first failure: writes on two "connections", one of them FUA, and a flush
 * whose fsync runs while more writes are served. Adds the fills acknowledged durable, as they
 * are, to `durable`.
 */
async function flushRaceWorkload(disk: LogAssistedDisk, durable: number[]): Promise<void> {
  const write = (fill: number, fua = false) =>
    disk.write(fill * WRITE_BYTES, new Uint8Array(WRITE_BYTES).fill(fill), { fua });
  await write(1);
  await write(2);
  const flushing = disk.flush(); // its fsync runs while the next writes are served
  const during = [write(3), write(4, true)];
  // A power cut can end the workload while these are out: their rejections are expected then.
  for (const request of [flushing, ...during]) request.catch(() => {});
  await flushing;
  durable.push(1, 2);
  await Promise.all(during);
  durable.push(4);
  await write(5);
  await disk.flush();
  durable.push(3, 5);
}

Deno.test("LogAssistedDisk: after a power cut at any operation, the device equals the journal and keeps every acknowledged write", async () => {
  // Before the fix, the flush fsynced the device first and journaled its flush entry after:
  // writes served during that fsync were skipped by replay, and the device diverged for good.
  let cuts = 0;
  for (const fileMode of CUT_MODES) {
    for (let cutAt = 1;; cutAt++) {
      const disk = new SimDisk({ seed: cutAt });
      let storage = disk.process();
      storage.mkdir("/s");
      await storage.syncDirectory("/");
      const device = storage.open("/s/disk.img", { create: true });
      device.truncate(65536);
      await device.syncData();
      device.close();
      const clock = new FakeClock();
      const tick = () => clock.advance(1);
      await takeSnapshot("/s/disk.img", "/s/log", { storage, clock: tick, hostId: "t" });
      disk.cutAfterOps(cutAt);
      const durable: number[] = [];
      const cut = new Promise<"cut">((resolve) => disk.onCut(() => resolve("cut")));
      const session = (async () => {
        const lad = await LogAssistedDisk.open("/s/disk.img", "/s/log", { storage, clock: tick });
        await flushRaceWorkload(lad, durable);
        await lad.close();
        return "finished" as const;
      })();
      session.catch(() => {});
      // After the cut the session's promises may never settle: the power is gone.
      const outcome = await Promise.race([session, cut]).catch((error) => {
        if (!(error instanceof PowerCutError)) throw error;
        return "cut" as const;
      });
      const finished = outcome === "finished";
      if (finished) {
        disk.cutAfterOps(undefined);
        break;
      }
      cuts++;
      if (disk.lastCut === undefined) disk.powerCut({ fileMode, dirMode: fileMode });
      storage = disk.process();
      const lad = await LogAssistedDisk.open("/s/disk.img", "/s/log", { storage, clock: tick });
      await lad.close();
      await restoreAt("/s/log", "/s/latest.img", { storage, nowUs: clock.nowUs + 1 });
      const what = `${fileMode} cut at operation ${cutAt}`;
      const onDevice = readFileBytes(storage, "/s/disk.img", Number.MAX_SAFE_INTEGER);
      assert.deepEqual(
        onDevice,
        readFileBytes(storage, "/s/latest.img", Number.MAX_SAFE_INTEGER),
        `${what}: device = restore`,
      );
      for (const fill of durable) {
        const sector = onDevice.subarray(fill * WRITE_BYTES, (fill + 1) * WRITE_BYTES);
        assert.ok(
          sector.every((byte) => byte === fill),
          `${what}: acknowledged write ${fill} lost`,
        );
      }
      const verified = await verifyLogdir("/s/log", { storage });
      assert.deepEqual(verified.problems, [], what);
    }
  }
  assert.ok(cuts > 40, `the workload was cut at ${cuts} points`);
});

/**
 * A writer left as a power cut leaves it: entries 1..`durable` fsynced (the sync record says
 * so), then `more` appended unsynced, and the process gone. Returns the live segment's path and
 * the offset of every entry.
 */
async function crashedJournal(
  logdir: string,
  clock: FakeClock,
  lock: LogdirLock,
  durable: number,
  more: number,
): Promise<{ path: string; offsets: number[] }> {
  const writer = await LogdirWriter.open(logdir, {
    purpose: "test",
    clock: clock.fn,
    lock,
    journalOnly: true,
  });
  const offsets: number[] = [];
  for (let i = 1; i <= durable + more; i++) {
    clock.advance(1000);
    offsets.push(writer.lastAppendedAt().segment.sizeBytes);
    await appendWrite(writer, i);
    if (i === durable) await writer.sync();
  }
  return { path: join(logdir, SEGMENTS_DIR, segmentFileName(1)), offsets };
}

Deno.test({
  name: "LogdirWriter.open() cuts a whole header in front of a torn payload and appends after it",
  sanitizeResources: false, // the crashed writer's files stay open, as after a power cut
  fn: async () => {
    await withTempDir(async (dir) => {
      const clock = new FakeClock();
      const { logdir } = await makeLogdir(dir, clock);
      const lock = await LogdirLock.acquire(logdir, "test");
      try {
        const { path, offsets } = await crashedJournal(logdir, clock, lock, 3, 1);
        // The last sector of entry 4's payload never reached the disk.
        const bytes = fs.readFileSync(path);
        bytes.fill(0, offsets[3] + ENTRY_BYTES - 100, offsets[3] + ENTRY_BYTES);
        fs.writeFileSync(path, bytes);
        const writer = await LogdirWriter.open(logdir, {
          purpose: "test",
          clock: clock.fn,
          lock,
          journalOnly: true,
        });
        assert.equal(writer.nextSeq, 4, "entry 4 is cut: its header was whole, its payload not");
        assert.equal(writer.recovery.tornBytes, ENTRY_BYTES);
        assert.equal(writer.recovery.tornProblem, "bad payload checksum");
        await appendWrite(writer, 9);
        await writer.close({ seal: true });
        // Before the fix the torn entry stayed, the seal made it permanent, verify failed for ever.
        const verified = await verifyLogdir(logdir);
        assert.deepEqual(verified.problems, []);
        assert.equal(verified.lastSeq, 4);
      } finally {
        lock.release();
      }
    });
  },
});

Deno.test({
  name: "LogdirWriter.open() cuts a torn tail whose payload holds entry headers the guest wrote",
  sanitizeResources: false,
  fn: async () => {
    await withTempDir(async (dir) => {
      const clock = new FakeClock();
      const { logdir } = await makeLogdir(dir, clock);
      const lock = await LogdirLock.acquire(logdir, "test");
      try {
        const writer = await LogdirWriter.open(logdir, {
          purpose: "test",
          clock: clock.fn,
          lock,
          journalOnly: true,
        });
        await appendWrite(writer, 1);
        await writer.sync();
        // The guest stores a sectorlog logdir: its data holds valid entry headers (seq 2, 3...).
        const payload = new Uint8Array(8 * WRITE_BYTES);
        for (let i = 0; i < 8; i++) {
          const inner = new Uint8Array(WRITE_BYTES).fill(0x40 + i);
          const header = makeEntryHeader(
            {
              kind: "write",
              seq: 3 + i,
              timeUs: clock.nowUs + 5000,
              offsetBytes: 0,
              lengthBytes: 448,
            },
            inner.subarray(0, 448),
          );
          encodeEntryHeader(header, payload, i * WRITE_BYTES);
          payload.set(inner.subarray(0, 448), i * WRITE_BYTES + ENTRY_HEADER_BYTES);
        }
        await writer.ready();
        writer.appendSync("write", 0, payload.length, payload);
        const path = join(logdir, SEGMENTS_DIR, segmentFileName(1));
        // Power cut: the first sectors of the big entry made it, the rest did not.
        fs.truncateSync(path, ENTRY_BYTES + ENTRY_HEADER_BYTES + 3 * WRITE_BYTES);
        const recovered = await LogdirWriter.open(logdir, {
          purpose: "test",
          clock: clock.fn,
          lock,
          journalOnly: true,
        });
        assert.equal(recovered.nextSeq, 2, "before the fix: refused as corrupt (exit 3)");
        assert.ok(recovered.recovery.tornBytes > 0);
        await recovered.close();
        assert.deepEqual((await verifyLogdir(logdir)).problems, []);
      } finally {
        lock.release();
      }
    });
  },
});

Deno.test({
  name:
    "LogdirWriter.open() ends the log at a lost write even when whole entries follow, and refuses damage the sync record says was durable",
  sanitizeResources: false,
  fn: async () => {
    await withTempDir(async (dir) => {
      const clock = new FakeClock();
      const { logdir } = await makeLogdir(dir, clock);
      const lock = await LogdirLock.acquire(logdir, "test");
      try {
        const { path, offsets } = await crashedJournal(logdir, clock, lock, 4, 4);
        const pristine = fs.readFileSync(path);
        // Unsynced writes reach the disk in any order: entry 5's write was lost, 6..8 were not.
        const lost = pristine.slice();
        lost.fill(0, offsets[4], offsets[4] + ENTRY_BYTES);
        fs.writeFileSync(path, lost);
        const writer = await LogdirWriter.open(logdir, {
          purpose: "test",
          clock: clock.fn,
          lock,
          journalOnly: true,
        });
        assert.equal(
          writer.nextSeq,
          5,
          "before the fix: 'bad magic (valid entries follow)', exit 3",
        );
        assert.equal(writer.recovery.tornBytes, 4 * ENTRY_BYTES);
        assert.equal(fs.statSync(path).size, offsets[4], "the cut is made");
        // Entries 1..4 were fsynced: damage among them is corruption, never a torn tail.
        for (let i = 5; i <= 8; i++) await appendWrite(writer, i);
        await writer.sync();
        const damaged = fs.readFileSync(path);
        damaged[offsets[2] + 9] ^= 0x40; // a bit of entry 3's seq
        fs.writeFileSync(path, damaged);
        await assert.rejects(
          LogdirWriter.open(logdir, { purpose: "test", clock: clock.fn, lock, journalOnly: true }),
          (error: unknown) => {
            assert.ok(error instanceof IntegrityError);
            assert.equal(error.offsetBytes, offsets[2]);
            assert.match(error.message, /durably written/);
            return true;
          },
        );
      } finally {
        lock.release();
      }
    });
  },
});

Deno.test({
  name: "mark while watch is stopped after a cut during a seal leaves the replay to watch",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    await withTempDir(async (dir) => {
      const clock = new FakeClock();
      const { device, logdir } = await makeLogdir(dir, clock);
      const lock = await LogdirLock.acquire(logdir, "watch");
      // A watch whose device never finishes its seal checkpoint: the power went out there.
      const crashed = await LogdirWriter.open(logdir, {
        purpose: "watch",
        clock: clock.fn,
        lock,
        segmentBytesMax: 2 * ENTRY_BYTES + 1,
        device: { syncThrough: () => new Promise(() => {}) },
      });
      for (let i = 1; i <= 5; i++) {
        clock.advance(1000);
        await appendWrite(crashed, i);
      }
      lock.release();
      assert.deepEqual(fs.readdirSync(join(logdir, SEGMENTS_DIR)).sort(), [
        segmentFileName(1),
        segmentFileName(4),
      ]);
      // The journal holds 5 writes the device never got. A mark must not seal them away.
      clock.advance(1000);
      const mark = await addMark(logdir, "after-the-cut", { clock: clock.fn });
      assert.equal(mark.via, "logdir");
      assert.deepEqual((await readManifest(logdir)).segments, [], "before the fix: sealed");
      const disk = await LogAssistedDisk.open(device, logdir, { clock: clock.fn });
      assert.equal(disk.recovery.replayedEntries, 5, "before the fix: 2 (the live tail only)");
      await disk.close();
      await restoreAt(logdir, join(dir, "latest.img"));
      assert.deepEqual(readAll(device), readAll(join(dir, "latest.img")));
      assert.deepEqual((await verifyLogdir(logdir)).problems, []);
    });
  },
});

Deno.test("snapshot --refresh: the horizon is never before an entry the new base holds", async () => {
  await withTempDir(async (dir) => {
    const ahead = new FakeClock(1_764_000_010_000_000); // the writer's clock, 10 s ahead
    const { device, logdir } = await makeLogdir(dir, new FakeClock());
    const disk = await LogAssistedDisk.open(device, logdir, { clock: ahead.fn });
    for (let i = 1; i <= 4; i++) {
      ahead.advance(1000);
      await disk.write(i * WRITE_BYTES, new Uint8Array(WRITE_BYTES).fill(i));
    }
    await disk.close();
    // The clock stepped back: the refresh's own clock is 10 s behind the stamps.
    const behind = new FakeClock(1_764_000_000_500_000);
    const result = await takeSnapshot(device, logdir, { refresh: true, clock: behind.fn });
    const manifest = await readManifest(logdir);
    assert.ok(manifest.horizonUs >= ahead.nowUs, "before the fix: the horizon was 10 s early");
    assert.equal(result.endedUs, manifest.horizonUs);
    await restoreAt(logdir, join(dir, "at-horizon.img"), {
      at: { kind: "instant", timeUs: manifest.horizonUs },
      nowUs: ahead.nowUs + 1,
    });
    assert.deepEqual(readAll(join(dir, "at-horizon.img")), readAll(device));
  });
});

export type { CutMode };
