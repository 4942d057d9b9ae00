import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { compactLogdir } from "../lib/compact.ts";
import { LogAssistedDisk } from "../lib/disk.ts";
import { IntegrityError } from "../lib/errors.ts";
import {
  readLogEntries,
  readManifest,
  SEGMENTS_DIR,
  withConsistentRead,
} from "../lib/format/logdir.ts";
import { restoreAt } from "../lib/restore.ts";
import { takeSnapshot } from "../lib/snapshot.ts";
import { assertBytesEqual, FakeClock, makeImage, readAll, withTempDir } from "./_helpers.ts";

async function makeLogdir(dir: string, clock: FakeClock) {
  const device = join(dir, "disk.img");
  const logdir = join(dir, "log");
  const model = await makeImage(device, 1 << 20);
  await takeSnapshot(device, logdir, { clock: clock.fn });
  const disk = await LogAssistedDisk.open(device, logdir, {
    clock: clock.fn,
    segmentBytesMax: 16 * 1024,
  });
  for (let i = 0; i < 40; i++) {
    clock.advance(1000);
    const data = new Uint8Array(4096).fill(i + 1);
    await disk.write((i % 10) * 4096, data);
    model.set(data, (i % 10) * 4096);
  }
  await disk.close({ seal: true });
  return { device, logdir, model };
}

Deno.test("withConsistentRead() reruns a read whose files a compaction removed under it", async () => {
  await withTempDir(async (dir) => {
    const clock = new FakeClock();
    const { logdir, model } = await makeLogdir(dir, clock);
    const stale = await readManifest(logdir);
    let attempts = 0;
    const output = join(dir, "out.img");
    const result = await withConsistentRead(logdir, async () => {
      attempts++;
      if (attempts === 1) {
        // A compaction lands between this reader's manifest read and its segment reads.
        await compactLogdir(logdir, { cutUs: clock.nowUs - 5000, nowUs: clock.nowUs });
        const removed = stale.segments.filter((s) =>
          !fs.existsSync(join(logdir, SEGMENTS_DIR, s.file))
        );
        assert.ok(removed.length > 0, "the compaction removed segments the stale manifest names");
        for await (const _ of readLogEntries(logdir, stale)) { /* hits a removed file */ }
        assert.fail("reading a removed segment must fail");
      }
      return await restoreAt(logdir, output, { nowUs: clock.nowUs });
    });
    assert.equal(attempts, 2);
    assert.equal(result.output, output);
    assertBytesEqual(readAll(output), model, "restore after the rerun");
  });
});

Deno.test("withConsistentRead() reports corruption at once when the manifest did not change", async () => {
  await withTempDir(async (dir) => {
    const { logdir } = await makeLogdir(dir, new FakeClock());
    let attempts = 0;
    await assert.rejects(
      withConsistentRead(logdir, () => {
        attempts++;
        return Promise.reject(new IntegrityError("corrupt"));
      }),
      IntegrityError,
    );
    assert.equal(attempts, 1);
  });
});
