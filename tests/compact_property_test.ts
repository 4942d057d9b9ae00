import assert from "node:assert/strict";
import { join } from "node:path";
import { main } from "../cli/main.ts";
import { compactLogdir, type CompactResult } from "../lib/compact.ts";
import { LogAssistedDisk } from "../lib/disk.ts";
import { IntegrityError } from "../lib/errors.ts";
import { LEVELS_DIR, readLogEntries, readManifest } from "../lib/format/logdir.ts";
import { SegmentScanner } from "../lib/format/segment.ts";
import { takeSnapshot } from "../lib/snapshot.ts";
import { readTimeline } from "../lib/timeline.ts";
import { verifyLogdir } from "../lib/verify.ts";
import {
  appendSteps,
  expectedAt,
  makeWorkload,
  restoreBytes,
  type Workload,
} from "./_compact_fixture.ts";
import {
  assertBytesEqual,
  FakeClock,
  makeImage,
  type Random,
  withSeed,
  withTempDir,
} from "./_helpers.ts";

/** Restores at the horizon, the present and random times between; each must equal the model. */
async function checkRestores(w: Workload, random: Random, horizonUs: number): Promise<void> {
  const nowUs = w.clock.nowUs;
  const times = [horizonUs, nowUs];
  for (let i = 0; i < 6; i++) times.push(random.int(horizonUs, nowUs));
  const stepTimes = w.history.filter((point) => point.timeUs >= horizonUs);
  for (let i = 0; i < 4; i++) times.push(stepTimes[random.int(0, stepTimes.length - 1)].timeUs);
  for (const timeUs of times) {
    const restored = await restoreBytes(w.logdir, timeUs, nowUs);
    assertBytesEqual(
      restored,
      expectedAt(w, timeUs),
      `restore at ${timeUs} (horizon ${horizonUs})`,
    );
  }
}

async function checkVerify(logdir: string): Promise<void> {
  const result = await verifyLogdir(logdir);
  assert.ok(result.ok, `verify: ${JSON.stringify(result.problems)}`);
}

/** Marks at or before the horizon are listed as no longer restorable; later ones are restorable. */
async function checkMarks(w: Workload, horizonUs: number): Promise<void> {
  const timeline = await readTimeline(w.logdir);
  assert.equal(timeline.marks.length, w.marks.length, "every mark is still listed");
  for (const mark of w.marks) {
    const listed = timeline.marks.find((m) => m.name === mark.name);
    assert.ok(listed !== undefined, `mark ${mark.name} listed`);
    assert.equal(listed.restorable, mark.timeUs > horizonUs, `mark ${mark.name} restorable`);
  }
}

Deno.test("compactLogdir() keeps every restore at or after the cut byte-identical over successive compactions", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const w = await makeWorkload(dir, random);
      let horizonUs = w.history[0].timeUs;
      for (let round = 0; round < 4; round++) {
        await appendSteps(w, random, 80, { overwriteHot: true });
        if (round === 0) await checkRestores(w, random, horizonUs); // the fixture itself
        const stepTimes = w.history.filter((point) => point.timeUs >= horizonUs);
        const pickUs = stepTimes[random.int(0, stepTimes.length - 1)].timeUs;
        const cutUs = random.int(0, 1) === 0 ? pickUs : Math.min(w.clock.nowUs, pickUs + 500);
        const result = await compactLogdir(w.logdir, { cutUs, nowUs: w.clock.nowUs });
        assert.equal(result.horizonUs, Math.max(cutUs, horizonUs), "the horizon moves to the cut");
        assert.equal(result.sealedVia, "compact");
        horizonUs = result.horizonUs;
        const manifest = await readManifest(w.logdir);
        assert.equal(manifest.horizonUs, horizonUs);
        assert.ok(manifest.levels.length <= 1, "at most one level");
        await checkVerify(w.logdir);
        await checkRestores(w, random, horizonUs);
        await checkMarks(w, horizonUs);
        await assert.rejects(
          restoreBytes(w.logdir, horizonUs - 1, w.clock.nowUs),
          (error: Error & { hint?: string }) => {
            assert.match(error.message, /earliest restorable time is/);
            assert.match(error.hint ?? "", /restorable window is/);
            return true;
          },
        );
      }
    });
  });
});

Deno.test("compactLogdir() dry run measures exactly what the real run then does", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const w = await makeWorkload(dir, random);
      await appendSteps(w, random, 60, { overwriteHot: true });
      await compactLogdir(w.logdir, { cutUs: w.history[20].timeUs, nowUs: w.clock.nowUs });
      await appendSteps(w, random, 60, { overwriteHot: true });
      const options = { cutUs: w.history[90].timeUs, nowUs: w.clock.nowUs };
      const planned = await compactLogdir(w.logdir, { ...options, dryRun: true });
      const done = await compactLogdir(w.logdir, options);
      const fields = (r: CompactResult) => [
        r.changed,
        r.cutSeq,
        r.horizonUs,
        r.foldedEntries,
        r.levelEntries,
        r.levelBytes,
        r.entriesBefore,
        r.entriesAfter,
        r.bytesBefore,
        r.bytesAfter,
        r.compactedMarks.length,
      ];
      assert.deepEqual(fields(planned), fields(done));
      assert.ok(done.reclaimedBytes > 0, "overwritten history reclaims bytes");
      await checkVerify(w.logdir);
      await checkRestores(w, random, done.horizonUs);
    });
  });
});

Deno.test("compactLogdir() with keepMarks cuts just before the earliest mark it would lose", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const w = await makeWorkload(dir, random);
      await appendSteps(w, random, 40);
      const disk = await LogAssistedDisk.open(w.devicePath, w.logdir, { clock: w.clock.fn });
      w.clock.advance(1000);
      await disk.mark("before-upgrade");
      w.marks.push({ name: "before-upgrade", timeUs: w.clock.nowUs });
      w.history.push({ timeUs: w.clock.nowUs, image: w.model.slice() });
      await disk.close();
      await appendSteps(w, random, 40);
      const markUs = w.marks.find((m) => m.name === "before-upgrade")!.timeUs;
      // A mark at the horizon itself is no restore point compaction can keep.
      const baseUs = w.history[0].timeUs;
      const earliestUs = Math.min(...w.marks.map((m) => m.timeUs).filter((t) => t > baseUs));
      const options = { cutUs: w.clock.nowUs, nowUs: w.clock.nowUs, keepMarks: true };
      const planned = await compactLogdir(w.logdir, { ...options, dryRun: true });
      assert.ok(
        planned.keepMarks !== undefined && planned.keepMarks.marks.includes("before-upgrade"),
      );
      assert.ok((planned.keepMarks.costBytes ?? 0) > 0, "the dry run shows what keeping costs");
      const result = await compactLogdir(w.logdir, options);
      assert.equal(result.horizonUs, earliestUs - 1);
      assert.ok(result.horizonUs < markUs);
      await checkMarks(w, result.horizonUs);
      const restored = await restoreBytes(w.logdir, markUs, w.clock.nowUs);
      assertBytesEqual(restored, expectedAt(w, markUs), "restore at the kept mark");
      await checkVerify(w.logdir);
    });
  });
});

Deno.test("compactLogdir() does nothing when the cut is at or before the horizon", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const w = await makeWorkload(dir, random);
      await appendSteps(w, random, 30);
      const first = await compactLogdir(w.logdir, {
        cutUs: w.history[15].timeUs,
        nowUs: w.clock.nowUs,
      });
      assert.ok(first.changed);
      const again = await compactLogdir(w.logdir, {
        cutUs: w.history[10].timeUs,
        nowUs: w.clock.nowUs,
      });
      assert.equal(again.changed, false);
      assert.equal(again.horizonUs, first.horizonUs);
      await assert.rejects(
        compactLogdir(w.logdir, { cutUs: w.clock.nowUs + 1, nowUs: w.clock.nowUs }),
        /the cut is in the future/,
      );
    });
  });
});

/** Entries (level and log) whose range covers `offsetBytes`. */
async function entriesCovering(logdir: string, offsetBytes: number): Promise<number> {
  const manifest = await readManifest(logdir);
  let count = 0;
  const covers = (h: { kind: string; offsetBytes: number; lengthBytes: number }) =>
    (h.kind === "write" || h.kind === "zero" || h.kind === "trim") &&
    h.offsetBytes <= offsetBytes && offsetBytes < h.offsetBytes + h.lengthBytes;
  for (const level of manifest.levels) {
    const scanner = new SegmentScanner(join(logdir, LEVELS_DIR, level.file), {
      tolerateTornTail: false,
      endBytes: level.sizeBytes,
      headersOnly: true,
    });
    for await (const { header } of scanner.entries()) if (covers(header)) count++;
  }
  for await (const { header } of readLogEntries(logdir, manifest, { headersOnly: true })) {
    if (covers(header)) count++;
  }
  return count;
}

Deno.test("claim 38: `compact --keep 0` leaves exactly one entry for a sector written N times", async () => {
  await withTempDir(async (dir) => {
    const devicePath = join(dir, "disk.img");
    const logdir = join(dir, "log");
    await makeImage(devicePath, 64 * 1024);
    const clock = new FakeClock();
    await takeSnapshot(devicePath, logdir, { clock: clock.fn });
    const disk = await LogAssistedDisk.open(devicePath, logdir, {
      clock: clock.fn,
      segmentBytesMax: 4096, // the writes spread over many segments
    });
    const sectorOffset = 8 * 512;
    for (let i = 1; i <= 50; i++) {
      clock.advance(1000);
      await disk.write(sectorOffset, new Uint8Array(512).fill(i));
      if (i % 7 === 0) await disk.flush();
    }
    await disk.close();
    assert.equal(await entriesCovering(logdir, sectorOffset), 50);
    assert.equal(await main(["compact", logdir, "--keep", "0"]), 0);
    assert.equal(await entriesCovering(logdir, sectorOffset), 1);
    const { horizonUs } = await readManifest(logdir); // the real clock's now: --keep 0
    const restored = await restoreBytes(logdir, horizonUs, horizonUs);
    assertBytesEqual(
      restored.subarray(sectorOffset, sectorOffset + 512),
      new Uint8Array(512).fill(50),
      "the surviving sector",
    );
    await checkVerify(logdir);
  });
});

Deno.test("compactLogdir() reports a corrupt payload it would keep instead of copying it into the level", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const w = await makeWorkload(dir, random);
      await appendSteps(w, random, 30);
      const disk = await LogAssistedDisk.open(w.devicePath, w.logdir, { clock: w.clock.fn });
      await disk.write(0, new Uint8Array(4096).fill(5)); // the last change: it survives the fold
      await disk.close();
      const manifest = await readManifest(w.logdir);
      let last: { path: string; offsetBytes: number } | undefined;
      for await (const entry of readLogEntries(w.logdir, manifest, { headersOnly: true })) {
        if (entry.header.kind === "write") {
          last = { path: entry.segmentPath, offsetBytes: entry.fileOffsetBytes };
        }
      }
      assert.ok(last !== undefined);
      const file = await Deno.open(last.path, { read: true, write: true });
      const byte = new Uint8Array(1);
      await file.seek(last.offsetBytes + 64, Deno.SeekMode.Start);
      await file.read(byte);
      byte[0] ^= 0xff;
      await file.seek(last.offsetBytes + 64, Deno.SeekMode.Start);
      await file.write(byte);
      file.close();
      await assert.rejects(
        compactLogdir(w.logdir, { cutUs: w.clock.nowUs, nowUs: w.clock.nowUs }),
        (error: Error) => {
          assert.ok(error instanceof IntegrityError, `IntegrityError, got ${error}`);
          assert.match(error.message, /bad payload checksum/);
          return true;
        },
      );
      assert.equal((await readManifest(w.logdir)).horizonUs, manifest.horizonUs, "unchanged");
      assert.deepEqual(Deno.readDirSync(join(w.logdir, LEVELS_DIR)).toArray(), []);
    });
  });
});
