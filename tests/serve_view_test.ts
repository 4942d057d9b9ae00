/** PastView: the device at a time, read from base, levels and segments through an extent index. */
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { compactLogdir } from "../lib/compact.ts";
import { LogAssistedDisk } from "../lib/disk.ts";
import { IntegrityError, UsageError } from "../lib/errors.ts";
import { readManifest, SEGMENTS_DIR } from "../lib/format/logdir.ts";
import { PastView } from "../lib/past_view.ts";
import { takeSnapshot } from "../lib/snapshot.ts";
import { assertBytesEqual, makeImage, withSeed, withTempDir } from "./_helpers.ts";
import { buildHistory } from "./_past_fixture.ts";

const DEVICE_BYTES = 4 * 1024 * 1024 + 3 * 512; // not a power of two: device-end edges matter

function readWhole(view: PastView): Uint8Array {
  const bytes = new Uint8Array(view.sizeBytes);
  view.readSync(0, bytes);
  return bytes;
}

Deno.test("PastView reads equal the model image at every phase, whole and in random pieces", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const history = await buildHistory(dir, random, {
        deviceBytes: DEVICE_BYTES,
        phases: 5,
        opsPerPhase: 12,
        writeBytesMax: 1_500_000,
        segmentBytesMax: 512 * 1024,
        compactThroughPhase: 2,
      });
      const manifest = await readManifest(history.logdir);
      assert.equal(manifest.levels.length, 1, "the fixture has a level");
      for (const [index, phase] of history.phases.entries()) {
        if (index < 2) continue; // before the horizon
        using view = await PastView.open(history.logdir, {
          at: { kind: "instant", timeUs: phase.timeUs },
          nowUs: history.clock.nowUs,
        });
        assertBytesEqual(readWhole(view), phase.image, `whole view at phase ${index}`);
        for (let i = 0; i < 200; i++) {
          const offset = random.int(0, DEVICE_BYTES - 1);
          const length = random.int(1, Math.min(DEVICE_BYTES - offset, 300_000));
          const piece = new Uint8Array(length);
          await view.read(offset, piece);
          assertBytesEqual(
            piece,
            phase.image.subarray(offset, offset + length),
            `read ${offset}+${length} at phase ${index}`,
          );
        }
        assert.ok(view.info.extents > 0 || index === 2);
      }
    });
  });
});

Deno.test("PastView refuses a time before the horizon and names the window", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const history = await buildHistory(dir, random, {
        deviceBytes: 1024 * 1024,
        phases: 2,
        opsPerPhase: 3,
        writeBytesMax: 65536,
        compactThroughPhase: 1,
      });
      await assert.rejects(
        () =>
          PastView.open(history.logdir, {
            at: { kind: "instant", timeUs: history.phases[0].timeUs },
            nowUs: history.clock.nowUs,
          }),
        (error: unknown) =>
          error instanceof UsageError && /earliest restorable time/.test(error.message) &&
          /restorable window is/.test(error.hint ?? ""),
      );
    });
  });
});

Deno.test("PastView keeps reading files a compaction removed while it was open", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const history = await buildHistory(dir, random, {
        deviceBytes: DEVICE_BYTES,
        phases: 3,
        opsPerPhase: 10,
        writeBytesMax: 400_000,
        segmentBytesMax: 256 * 1024,
      });
      const phase = history.phases[3];
      using view = await PastView.open(history.logdir, {
        at: { kind: "instant", timeUs: phase.timeUs },
        nowUs: history.clock.nowUs,
      });
      const before = [...Deno.readDirSync(join(history.logdir, SEGMENTS_DIR))].length;
      await compactLogdir(history.logdir, { cutUs: phase.timeUs, nowUs: history.clock.nowUs });
      const after = [...Deno.readDirSync(join(history.logdir, SEGMENTS_DIR))].length;
      assert.ok(after < before, `compaction removed segments (${before} → ${after})`);
      assertBytesEqual(readWhole(view), phase.image, "view after its files were removed");
    });
  });
});

Deno.test("PastView fails a read of a corrupt payload with an IntegrityError naming the file", async () => {
  await withTempDir(async (dir) => {
    const devicePath = join(dir, "disk.img");
    const logdir = join(dir, "log");
    await makeImage(devicePath, 1024 * 1024);
    await takeSnapshot(devicePath, logdir);
    const disk = await LogAssistedDisk.open(devicePath, logdir);
    await disk.write(8192, new Uint8Array(4096).fill(7));
    await disk.close();
    const segmentsDir = join(logdir, SEGMENTS_DIR);
    const segment = join(segmentsDir, [...Deno.readDirSync(segmentsDir)][0].name);
    const fd = fs.openSync(segment, "r+");
    try {
      // The first entry is the write: flip a byte of its payload (after the 64-byte header).
      fs.writeSync(fd, new Uint8Array([8]), 0, 1, 64 + 10);
    } finally {
      fs.closeSync(fd);
    }
    using view = await PastView.open(logdir);
    for (let attempt = 0; attempt < 2; attempt++) {
      await assert.rejects(
        () => view.read(8192, new Uint8Array(512)),
        (error: unknown) => error instanceof IntegrityError && error.path === segment,
        "every read of the corrupt entry fails (async path)",
      );
    }
    const untouched = new Uint8Array(4096);
    view.readSync(0, untouched); // ranges the corrupt entry does not cover still read
    assert.throws(
      () => view.readSync(8192, new Uint8Array(512)),
      (error: unknown) =>
        error instanceof IntegrityError && error.path === segment &&
        /bad payload checksum/.test(error.message),
    );
  });
});
