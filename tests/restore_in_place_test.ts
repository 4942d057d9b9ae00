/**
 * restore --in-place: the watched device put back to a past state by journaled writes of only
 * the blocks that differ, a `restored-to:` mark, and an undo by restoring to the seq before it.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { LogAssistedDisk } from "../lib/disk.ts";
import { BusyError, IntegrityError } from "../lib/errors.ts";
import { restoreAt } from "../lib/restore.ts";
import { restoreInPlace } from "../lib/restore_in_place.ts";
import { readTimeline } from "../lib/timeline.ts";
import { assertBytesEqual, Random, readAll, withSeed, withTempDir } from "./_helpers.ts";
import { buildHistory, type History, timeArg } from "./_past_fixture.ts";
import { runCli } from "./_watch_harness.ts";

const DEVICE_BYTES = 4 * 1024 * 1024 + 512;
const CHUNK_BYTES = 1024 * 1024;
const BLOCK_BYTES = 4096;

async function history(dir: string, random: Random): Promise<History> {
  return await buildHistory(dir, random, {
    deviceBytes: DEVICE_BYTES,
    phases: 4,
    opsPerPhase: 6,
    writeBytesMax: 600_000,
    segmentBytesMax: 512 * 1024,
    compactThroughPhase: 1,
  });
}

/**
 * The bytes an in-place restore from `now` to `past` must write: within the ranges written after
 * the point (merged, walked a 1 MiB chunk at a time), the 4 KiB blocks whose bytes differ.
 */
function expectedWrittenBytes(h: History, target: number, now: Uint8Array): number {
  const touched = new Uint8Array(DEVICE_BYTES);
  for (const phase of h.phases.slice(target + 1)) {
    for (const r of phase.written) touched.fill(1, r.offsetBytes, r.offsetBytes + r.lengthBytes);
  }
  const past = h.phases[target].image;
  let bytes = 0;
  for (let start = 0; start < DEVICE_BYTES; start++) {
    if (touched[start] === 0) continue;
    let end = start;
    while (end < DEVICE_BYTES && touched[end] === 1) end++;
    for (let chunk = start; chunk < end; chunk += CHUNK_BYTES) {
      const chunkEnd = Math.min(end, chunk + CHUNK_BYTES);
      for (let block = chunk; block < chunkEnd; block += BLOCK_BYTES) {
        const blockEnd = Math.min(chunkEnd, block + BLOCK_BYTES);
        for (let i = block; i < blockEnd; i++) {
          if (past[i] !== now[i]) {
            bytes += blockEnd - block;
            break;
          }
        }
      }
    }
    start = end;
  }
  return bytes;
}

Deno.test("restoreInPlace() writes only differing blocks, equals a full restore, and can be undone", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const h = await history(dir, random);
      const latest = h.phases[4].image;
      assertBytesEqual(readAll(h.devicePath), latest, "the device before");
      h.clock.advance(10_000);
      const result = await restoreInPlace(h.logdir, h.devicePath, {
        at: { kind: "instant", timeUs: h.phases[2].timeUs },
        nowUs: h.clock.nowUs,
        clock: h.clock.fn,
        verify: true,
      });
      assertBytesEqual(readAll(h.devicePath), h.phases[2].image, "the device after");
      const full = join(dir, "full.img");
      await restoreAt(h.logdir, full, {
        at: { kind: "instant", timeUs: h.phases[2].timeUs },
        nowUs: h.clock.nowUs,
      });
      assertBytesEqual(readAll(h.devicePath), readAll(full), "in place vs full restore");
      assert.equal(result.bytesWritten, expectedWrittenBytes(h, 2, latest), "bytes written");
      assert.equal(result.bytesWritten + result.bytesUnchanged, result.candidateBytes);
      assert.ok(result.rangesWritten > 0 && result.rangesWritten <= result.candidateBytes);
      assert.equal(result.verifiedBytes, DEVICE_BYTES);
      assert.match(result.mark.name, /^restored-to:\d{4}-\d\d-\d\dT/);

      // The log describes the device: its latest state is the device, the mark is listed, and
      // the seq before the restore gives the device as it was just before.
      const timeline = await readTimeline(h.logdir);
      assert.ok(timeline.marks.some((mark) => mark.name === result.mark.name));
      assert.equal(timeline.lastSeq, result.mark.seq);
      const newest = join(dir, "newest.img");
      await restoreAt(h.logdir, newest, { nowUs: h.clock.nowUs });
      assertBytesEqual(readAll(newest), h.phases[2].image, "latest restore after in place");
      const before = join(dir, "before.img");
      await restoreAt(h.logdir, before, { at: { kind: "seq", seq: result.beforeSeq } });
      assertBytesEqual(readAll(before), latest, "restore at the seq before the in-place restore");

      h.clock.advance(10_000);
      const undo = await restoreInPlace(h.logdir, h.devicePath, {
        at: { kind: "seq", seq: result.beforeSeq },
        nowUs: h.clock.nowUs,
        clock: h.clock.fn,
      });
      assertBytesEqual(readAll(h.devicePath), latest, "the device after the undo");
      assert.equal(undo.bytesWritten, result.bytesWritten, "the undo writes the same blocks back");
    });
  });
});

Deno.test("restoreInPlace() compares before writing: a range written back to its old bytes is skipped", async () => {
  await withTempDir(async (dir) => {
    const h = await buildHistory(dir, new Random(1), {
      deviceBytes: 1024 * 1024,
      phases: 0,
      opsPerPhase: 0,
    });
    const disk = await LogAssistedDisk.open(h.devicePath, h.logdir, { clock: h.clock.fn });
    const original = readAll(h.devicePath).slice(8192, 8192 + 65536);
    h.clock.advance(1000);
    const pointUs = h.clock.advance(1000);
    h.clock.advance(1000);
    await disk.write(8192, new Uint8Array(65536).fill(0xee));
    await disk.write(8192, original);
    await disk.close();
    h.clock.advance(1000);
    const result = await restoreInPlace(h.logdir, h.devicePath, {
      at: { kind: "instant", timeUs: pointUs },
      nowUs: h.clock.nowUs,
      clock: h.clock.fn,
    });
    assert.equal(result.candidateRanges, 1);
    assert.equal(result.candidateBytes, 65536);
    assert.equal(result.rangesWritten, 0);
    assert.equal(result.bytesWritten, 0);
    assert.equal(result.bytesUnchanged, 65536);
  });
});

Deno.test("restoreInPlace() is refused while another process holds the logdir (watch)", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const h = await history(dir, random);
      const disk = await LogAssistedDisk.open(h.devicePath, h.logdir);
      try {
        await assert.rejects(
          () => restoreInPlace(h.logdir, h.devicePath, { at: { kind: "seq", seq: 1 } }),
          (error: unknown) => error instanceof BusyError && /stop watch first/.test(error.message),
        );
      } finally {
        await disk.close();
      }
    });
  });
});

Deno.test("restoreInPlace() with verify reports a device that something else wrote", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const h = await history(dir, random);
      // A write behind watch's back, after the last entry: the log does not know about it.
      const fd = fs.openSync(h.devicePath, "r+");
      try {
        const byte = new Uint8Array([h.phases[2].image[DEVICE_BYTES - 1] ^ 0x5a]);
        fs.writeSync(fd, byte, 0, 1, DEVICE_BYTES - 1);
      } finally {
        fs.closeSync(fd);
      }
      const touchedLast = h.phases.slice(3).some((phase) =>
        phase.written.some((r) => r.offsetBytes + r.lengthBytes === DEVICE_BYTES)
      );
      if (touchedLast) return; // the restore would rewrite that byte anyway
      await assert.rejects(
        () =>
          restoreInPlace(h.logdir, h.devicePath, {
            at: { kind: "instant", timeUs: h.phases[2].timeUs },
            nowUs: h.clock.nowUs,
            verify: true,
          }),
        (error: unknown) =>
          error instanceof IntegrityError && error.offsetBytes === DEVICE_BYTES - 1,
      );
    });
  });
});

Deno.test("sectorlog restore --in-place: JSON summary, undo hint; output must be the device or omitted", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const h = await history(dir, random);
      const at = timeArg(h.phases[3].timeUs);
      const result = await runCli(["restore", h.logdir, "--at", at, "--in-place", h.devicePath]);
      assert.equal(result.code, 0, result.stderr);
      assert.match(result.stderr, /undo with: sectorlog restore .* --at seq:\d+ --in-place /);
      assertBytesEqual(readAll(h.devicePath), h.phases[3].image, "device after CLI restore");

      const again = await runCli([
        "restore",
        h.logdir,
        h.devicePath,
        "--at",
        timeArg(h.phases[2].timeUs),
        "--in-place",
        h.devicePath,
        "--json",
      ]);
      assert.equal(again.code, 0, again.stderr);
      const json = JSON.parse(again.stdout);
      assert.equal(json.command, "restore");
      assert.equal(json.inPlace, true);
      assert.equal(typeof json.rangesWritten, "number");
      assertBytesEqual(readAll(h.devicePath), h.phases[2].image, "device after second restore");

      const other = await runCli([
        "restore",
        h.logdir,
        join(dir, "other.img"),
        "--in-place",
        h.devicePath,
      ]);
      assert.equal(other.code, 2, other.stderr);
      assert.match(other.stderr, /--in-place/);
      const none = await runCli(["restore", h.logdir]);
      assert.equal(none.code, 2, none.stderr);
      assert.match(none.stderr, /output/);
    });
  });
});
